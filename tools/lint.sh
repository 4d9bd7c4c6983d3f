#!/usr/bin/env bash
# bash tools/lint.sh [PATHS]: ruff's lint and format check over the tree (settings: pyproject.toml [tool.ruff]),
# with the ruff of one leg's venv ($GRASP_LEG, by default the primary one; built by tools/setup-env.sh if need be).
# `ruff format .` (from that venv) applies the formatting this checks.
set -euo pipefail
cd "$(dirname "$0")/.."
leg=$(bash tools/setup-env.sh ${GRASP_LEG:+"$GRASP_LEG"})
ruff=.venvs/$leg/bin/ruff
echo "lint.sh: $($ruff --version) (leg $leg)"
"$ruff" check "${@:-.}"
"$ruff" format --check "${@:-.}"
