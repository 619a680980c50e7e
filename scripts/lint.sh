#!/usr/bin/env bash
# Lint, format and `# Copied from` check (CI runs this before the tests; fails on any violation). Fix locally with
# `.venv/bin/ruff check --fix . && .venv/bin/ruff format . && .venv/bin/python scripts/check_copies.py --fix`
# (or `pre-commit install` to run ruff on every commit).
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF="${RUFF:-.venv/bin/ruff}"
"$RUFF" check .
"$RUFF" format --check .
"${PYTHON:-.venv/bin/python}" scripts/check_copies.py
