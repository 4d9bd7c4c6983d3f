#!/usr/bin/env bash
# bash tools/test.sh [PYTEST ARGS]: the test suite of one leg of the CI matrix, from scratch if need be
# (creates .venvs/LEG, installs, runs pytest). The leg is $GRASP_LEG, by default the primary one: the newest
# this machine's Python allows (tools/legs.sh). `bash .ci/run` runs every leg.
set -euo pipefail
cd "$(dirname "$0")/.."
leg=$(bash tools/setup-env.sh ${GRASP_LEG:+"$GRASP_LEG"})
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
echo "test.sh: leg $leg ($(.venvs/"$leg"/bin/python -V))"
exec ".venvs/$leg/bin/python" -m pytest -q "$@"
