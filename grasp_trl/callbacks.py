"""`GraspCallback`: the post-step projection for any `transformers.Trainer` (TRL's, Axolotl's, your own).

`on_optimizer_step` runs after the optimizer step in plain training and under DeepSpeed alike (there the step
already happened inside `accelerator.backward`), and only at gradient-accumulation boundaries, which is when
the weights changed. That is where `weights` mode restores its constraint exactly.

Engines: single process, DDP and DeepSpeed ZeRO-1/2/3 (with or without offload) are supported; FSDP is
rejected by `reject_fsdp` (see docs/SUPPORT.md).
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from .projection import GradientProjector


def reject_fsdp(args) -> None:
    """Raise when the run uses FSDP: it replaces the model's parameters by flattened/sharded ones of its own, so
    the per-parameter gradient hooks and the post-step projection of `weights` mode would silently miss them.
    DeepSpeed ZeRO-3 shards as much and GRASP is exact under it."""
    fsdp = getattr(args, "fsdp", None)
    if fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise ValueError(f"GRASP does not support FSDP (fsdp={fsdp or 'ACCELERATE_USE_FSDP'}): its per-parameter "
                         "gradient hooks and post-step projection cannot see FSDP's flattened/sharded parameters. "
                         "For sharded training use DeepSpeed ZeRO-3 instead (deepspeed=recipes/deepspeed/zero3.json "
                         "or zero3_offload.json; see docs/SUPPORT.md).")


class GraspCallback(TrainerCallback):
    """Calls `projector.project_parameters()` after every optimizer step; adds GRASP metrics to the logs."""

    def __init__(self, projector: GradientProjector | None = None):
        self.projector = projector

    def on_train_begin(self, args, state, control, **kwargs):
        if self.projector is not None:
            reject_fsdp(args)

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
