#!/usr/bin/env bash
# Lint and format check (CI runs this before the tests; fails on any violation). Fix locally with
# `.venv/bin/ruff check --fix . && .venv/bin/ruff format .` (or `pre-commit install` to run it on every commit).
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF="${RUFF:-.venv/bin/ruff}"
"$RUFF" check .
"$RUFF" format --check .
