#!/usr/bin/env bash
# Set everything up (scripts/setup.sh, skipped with SKIP_SETUP=1) and run the test suite offline, spread over the
# machine's cores (pytest-xdist: one worker per core, each module's tests on one worker so that its module-scoped
# fixtures, such as the golden runs that the pipeline and front-door tests share, are built once; one CPU thread per
# worker). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the quick tier, or
# `PYTEST_WORKERS=0 bash scripts/test.sh tests/x.py` for one process.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
workers="${PYTEST_WORKERS:-auto}"
if [ "$workers" = 0 ]; then
    parallel=()
else
    parallel=(-n "$workers" --dist loadscope)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider --durations=20 "${parallel[@]}" "$@"
