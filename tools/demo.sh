#!/usr/bin/env bash
# The main job: installs if need be (the primary leg, tools/setup-env.sh), then runs `grasp demo` (tiny
# model, naive LoRA, identify, project).
set -euo pipefail
cd "$(dirname "$0")/.."
leg=$(bash tools/setup-env.sh)
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
exec ".venvs/$leg/bin/grasp" demo "$@"
