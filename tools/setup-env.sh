#!/usr/bin/env bash
# bash tools/setup-env.sh [LEG]: create .venvs/LEG and install grasp-trl with the leg's extras at the exact
# versions CI tests it with (tools/legs.sh, constraints*.txt). Without LEG: the primary leg, the newest one
# this machine's Python allows, which is also linked as .venv. Re-installs only when pyproject.toml or the
# leg's constraints file changed. Prints the leg's name.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/legs.sh
leg=${1:-$(primary_leg)}
check_leg "$leg"
python=$(find_python "${LEG_PYTHON[$leg]}")
venv=.venvs/$leg
constraints=${LEG_CONSTRAINTS[$leg]}
if [ ! -x "$venv/bin/python" ]; then
    echo "setup-env: creating $venv with $python" >&2
    "$python" -m venv "$venv"
fi
stamp=$venv/.grasp-install-stamp
want=$(cat pyproject.toml "$constraints" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup-env: installing grasp-trl[${LEG_EXTRAS[$leg]}] into $venv (-c $constraints)" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # torch first, alone: pip then takes the local CPU build where there is one instead of resolving a CUDA one
    "$venv/bin/python" -m pip install --quiet -c "$constraints" torch
    "$venv/bin/python" -m pip install --quiet -c "$constraints" -e ".[${LEG_EXTRAS[$leg]}]"
    echo "$want" > "$stamp"
fi
if [ $# -eq 0 ] && [ "$(readlink .venv 2>/dev/null)" != "$venv" ]; then
    # .venv was a plain venv before the matrix; the link keeps `.venv/bin/...` commands working
    [ -e .venv/.grasp-install-stamp ] && [ ! -L .venv ] && rm -rf .venv
    ln -sfn "$venv" .venv
fi
echo "$leg"
