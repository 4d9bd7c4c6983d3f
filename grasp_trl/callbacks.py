"""`GraspCallback`: the post-step projection for any `transformers.Trainer` (TRL's, Axolotl's, your own).

`on_optimizer_step` runs after the optimizer step in plain training and under DeepSpeed alike (there the step
already happened inside `accelerator.backward`), and only at gradient-accumulation boundaries, which is when
the weights changed. That is where `weights` mode restores its constraint exactly.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .projection import GradientProjector


class GraspCallback(TrainerCallback):
    """Calls `projector.project_parameters()` after every optimizer step; adds GRASP metrics to the logs."""

    def __init__(self, projector: GradientProjector | None = None):
        self.projector = projector

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.projector is not None:
            self.projector.project_parameters()

    def metrics(self) -> dict[str, float]:
        """`grasp/leakage` and `grasp/grad_removed_fraction` since the last call (empty when inactive)."""
        if self.projector is None:
            return {}
        result = {"grasp/leakage": self.projector.leakage()}
        removed = self.projector.pop_grad_removed_fraction()
        if removed is not None:
            result["grasp/grad_removed_fraction"] = removed
        return result

    def on_log(self, args, state, control, logs=None, **kwargs):
        """For trainers whose `log` GRASP does not override (Axolotl's): the metrics join the log history."""
        if logs is not None and "loss" in logs and not any(k.startswith("grasp/") for k in logs):
            extra = self.metrics()
            logs.update(extra)
            if state.log_history and state.log_history[-1] is not logs:
                state.log_history[-1].update(extra)
