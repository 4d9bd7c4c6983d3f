"""`GraspPlugin`: GRASP for `axolotl train` with two YAML lines.

    plugins:             # Axolotl 0.19; Axolotl >= 0.21 loads the plugin from its entry point (pyproject.toml)
      - axolotl_plugin.GraspPlugin
    grasp: true          # plus grasp_directions or grasp_identify_steps (see README.md)

The plugin does not swap Axolotl's trainer class (Axolotl 0.19 drops the model under `rl:` when a plugin does,
and its SFT trainer is not TRL's). Instead `post_trainer_create` mixes `GraspTrainerMixin` into the trainer
Axolotl built — `AxolotlTrainer` for SFT, `AxolotlDPOTrainer` for `rl: dpo` — and calls `grasp_setup`, which
gives identify-then-project inside `trainer.train()`, the post-step projection callback, the direction file in
checkpoints, resume, and the `grasp/*` metrics in the logs. `post_train` puts the direction file next to the
final adapter (Axolotl saves that with `model.save_pretrained`, not through the trainer).
"""

from __future__ import annotations

import logging
from pathlib import Path

from axolotl.integrations.base import BasePlugin

from grasp_trl.config import DIRECTIONS_FILENAME
from grasp_trl.directions import DirectionSet, sha256_of
from grasp_trl.trainer import GraspTrainerMixin, check_layers

from .args import GraspArgs, grasp_arguments

__all__ = ["GraspPlugin", "GraspArgs", "with_grasp", "check_layers"]

LOG = logging.getLogger(__name__)

_GRASP_CLASSES: dict[type, type] = {}


def with_grasp(trainer):
    """Turn an already built trainer into a GRASP trainer by mixing `GraspTrainerMixin` into its class.

    The class is created once per trainer class; `grasp_setup` still has to be called.
    """
    cls = type(trainer)
    if not issubclass(cls, GraspTrainerMixin):
        if cls not in _GRASP_CLASSES:
            _GRASP_CLASSES[cls] = type(f"Grasp{cls.__name__}", (GraspTrainerMixin, cls), {"__module__": __name__})
        trainer.__class__ = _GRASP_CLASSES[cls]
    return trainer


class GraspPlugin(BasePlugin):
    """Axolotl plugin: `grasp: true` plus the `grasp_*` keys (declared by `GraspArgs`)."""

    def __init__(self):
        super().__init__()
        self.trainer = None

    def get_input_args(self) -> str:
        return "axolotl_plugin.args.GraspArgs"

    def pre_model_load(self, cfg):
        """Read the direction file before the (possibly large) model loads, so a bad path fails in seconds."""
        if cfg.get("grasp") and cfg.get("grasp_directions"):
            DirectionSet.load(cfg["grasp_directions"])

    def post_trainer_create(self, cfg, trainer):
        """Mix GRASP into the trainer for `grasp: true`, or for the drift monitor alone (`grasp_drift_steps`)."""
        if not cfg.get("grasp") and cfg.get("grasp_drift_steps") is None:
            return
        grasp_args = grasp_arguments(cfg)
        with_grasp(trainer).grasp_setup(grasp_args)
        self.trainer = trainer
        if grasp_args.grasp_enabled:
            LOG.warning(
                "GRASP installed on %s (%s)",
                type(trainer).__name__,
                "direction file"
                if grasp_args.grasp_directions
                else f"identify after {grasp_args.grasp_identify_steps} steps"
                if grasp_args.grasp_identify_steps != "auto"
                else "identify when the stopping rule fires",
            )
        else:
            LOG.warning("GRASP drift monitor only (no projection) on %s", type(trainer).__name__)

    def post_train(self, cfg, model):
        """Write the direction file that was projected (the bytes read at install, not whatever is on disk now)
        next to the final adapter. Idempotent: Axolotl calls this twice."""
        trainer = self.trainer
        if trainer is None or trainer.grasp_projector is None or not trainer.is_world_process_zero():
            return
        directions = trainer.grasp_directions
        target = Path(cfg["output_dir"]) / DIRECTIONS_FILENAME
        if target.is_file() and sha256_of(target) == directions.sha256:
            return
        directions.write_recorded(target)
        LOG.info("GRASP: direction file written to %s", target)
