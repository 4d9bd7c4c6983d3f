#!/usr/bin/env bash
# Create .venv (Python 3.11) and install grasp-trl with every extra at the exact versions CI tests
# (constraints.txt). Re-runs the install only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.grasp-install-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first, alone: pip then takes the local CPU build instead of resolving a CUDA one
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[all]"
    echo "$want" > "$stamp"
fi
