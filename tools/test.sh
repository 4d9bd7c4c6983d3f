#!/usr/bin/env bash
# The whole test suite, from scratch if need be: creates .venv, installs everything, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup-env.sh
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
exec .venv/bin/python -m pytest -q "$@"
