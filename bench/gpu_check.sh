#!/usr/bin/env bash
# The one prepared GPU check (see bench/gpu_check.py): bash bench/gpu_check.sh [--cpu] [--out DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu_check.py "$@"
