"""`GraspCallback`: the post-step projection for any `transformers.Trainer` (TRL's, Axolotl's, your own).

`on_optimizer_step` runs after the optimizer step in plain training and under DeepSpeed alike (there the step
already happened inside `accelerator.backward`), and only at gradient-accumulation boundaries, which is when
the weights changed. That is where `weights` mode restores its constraint exactly.

Engines: single process, DDP, DeepSpeed ZeRO-1/2/3 (with or without offload) and FSDP2 are supported; FSDP1
(and `clamp` under FSDP2) is rejected by `fsdp.reject_fsdp` (see docs/SUPPORT.md): the trainers check at
construction; a `GraspCallback` used on its own checks when training begins.
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .fsdp import reject_fsdp
from .lora import factors_from_peft_model
from .projection import GradientProjector
from .stopping import GapRule, snapshot


class GraspCallback(TrainerCallback, ExportableState):
    """Calls `projector.project_parameters()` after every optimizer step; `metrics()` gives GRASP's log entries.

    As an `ExportableState` it records `directions_sha256`, the hash of the direction file being projected, in
    every checkpoint's `trainer_state.json` (`stateful_callbacks.GraspCallback`), so a checkpoint says which
    directions trained it and resuming can check the file beside it is that one."""

    def __init__(self, projector: GradientProjector | None = None, directions_sha256: str | None = None):
        self.projector = projector
        self.directions_sha256 = directions_sha256
        self.fsdp_checked = False  # the Grasp trainers ran `reject_fsdp` at construction already

    def state(self) -> dict:
        return {"args": {}, "attributes": {"directions_sha256": self.directions_sha256}}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.projector is not None and not self.fsdp_checked:
            reject_fsdp(args, projection=self.projector.projection)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.projector is not None:
            self.projector.project_parameters()

    def metrics(self) -> dict[str, float]:
        """`grasp/leakage` and the removed gradient shares since the last call (empty when inactive):
        `grasp/residual_grad_removed_fraction` (block outputs' gradients; `activations`, `both`) and
        `grasp/weight_grad_removed_fraction` (constrained parameters' gradients; `weights`, `both`). The
        trainers' `log` merges them into every loss line (before the reporting callbacks see it)."""
        if self.projector is None:
            return {}
        result = {"grasp/leakage": self.projector.leakage()}
        for kind, removed in self.projector.pop_grad_removed_fractions().items():
            result[f"grasp/{kind}_grad_removed_fraction"] = removed
        return result


class GapStoppingCallback(TrainerCallback):
    """Stage 1 with `grasp_identify_steps: auto`: every `rule.every` optimizer steps, snapshot the model's LoRA
    update and stop training when the `GapRule` fires (every rank computes the same snapshot, so all stop at
    the same step)."""

    def __init__(self, model, rule: GapRule, target_modules=None):
        self.model, self.rule, self.target_modules = model, rule, target_modules

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.rule.every == 0:
            factors = factors_from_peft_model(self.model, target_modules=self.target_modules)
            if self.rule.update(snapshot(factors, state.global_step, "stage 1's LoRA adapter")):
                control.should_training_stop = True

    def report(self, final_step: int) -> dict:
        """What stopped stage 1 and the spectrum trace (saved in `grasp_stage1/spectrum.json`)."""
        reason = self.rule.stop_reason or f"step {final_step}: reached the stage-1 budget before the rule fired"
        return {
            "rule": {"name": "gap", "every": self.rule.every, "drop": self.rule.drop, "min_cos": self.rule.min_cos},
            "stopped_at": final_step,
            "reason": reason,
            "trace": self.rule.trace(),
        }
