#!/usr/bin/env bash
# Create .venv with the package and its `dev` extra (pyproject.toml) at the versions pinned in constraints.txt
# (torch 2.13.0: the CPU wheel where it lies on disk).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]" > .venv/pip.log 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" .venv/pip.log >&2
    exit 1
fi
.venv/bin/python -c "import skyreels_diffusers, torch, diffusers; print('skyreels-diffusers', skyreels_diffusers.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"
