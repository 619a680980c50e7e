#!/usr/bin/env bash
# Set everything up (scripts/setup.sh, skipped with SKIP_SETUP=1) and run the test suite offline.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the quick tier.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
