"""grasp-trl: GRadient projection of Associated Spurious Patterns for TRL and Axolotl fine-tuning.

Stage 1 (`extract_directions`) identifies a spurious latent factor as the top singular directions of a naive
LoRA update in residual-stream space; stage 2 (`GradientProjector`, or the `GraspSFTTrainer` /
`GraspDPOTrainer` front ends) re-trains with those directions projected out of the learning signal.
"""

from .directions import DirectionFileError, DirectionSet
from .identify import extract_directions
from .projection import GradientProjector

__all__ = ["DirectionSet", "DirectionFileError", "extract_directions", "GradientProjector"]


def __getattr__(name):  # the trainers pull in TRL; import them lazily so the core stays light
    if name in {"GraspSFTTrainer", "GraspSFTConfig", "GraspDPOTrainer", "GraspDPOConfig"}:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
