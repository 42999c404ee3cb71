#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with CPU torch (when no torch is there)
# and pvae installed editable with its dev extras. Used by the Makefile; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${PVAE_TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    # --system-site-packages lets a torch the user already has (CUDA or not) be reused.
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.pvae-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    # No torch yet: install the CPU build first so that no dependency pulls the CUDA one.
    echo "setup: installing $TORCH_SPEC (CPU build) first" >&2
    "$PY" -m pip install --quiet "$TORCH_SPEC"
fi
"$PY" -m pip install --quiet -e ".[dev]"
touch "$stamp"
