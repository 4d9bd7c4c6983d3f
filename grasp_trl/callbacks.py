"""`GraspCallback`: the post-step projection for any `transformers.Trainer` (TRL's, Axolotl's, your own).

`on_optimizer_step` runs after the optimizer step in plain training and under DeepSpeed alike (there the step
already happened inside `accelerator.backward`), and only at gradient-accumulation boundaries, which is when
the weights changed. That is where `weights` mode restores its constraint exactly.

Engines: single process, DDP, DeepSpeed ZeRO-1/2/3 (with or without offload) and FSDP2 are supported; FSDP1
(and `clamp` under FSDP2) is rejected by `reject_fsdp` (see docs/SUPPORT.md).
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .identify import factors_from_peft_model
from .projection import GradientProjector
from .stopping import GapRule, snapshot


def reject_fsdp(args, accelerator=None, projection: str | None = None) -> None:
    """Raise, before any step, when the run uses an FSDP setting GRASP does not support.

    FSDP2 (`fully_shard`, DTensor parameters; transformers' `fsdp_config={"version": 2}`, the default in
    transformers 5, or accelerate's `FSDP_VERSION=2`) is supported for `activations`, `weights` and `both`:
    the residual hooks act inside autograd, and `weights` mode projects each rank's shard (`grasp_trl.fsdp`).
    FSDP1 (flattened `FlatParameter`s) and `clamp` under FSDP2 (untested) are rejected, naming the alternative.
    The version comes from the accelerator's FSDP plugin when there is one, else from `args` and the
    environment (`grasp_trl.fsdp.fsdp_version`)."""
    from .fsdp import fsdp_version

    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    version = getattr(plugin, "fsdp_version", None) if plugin is not None else fsdp_version(args)
    if version is None:
        return
    if int(version) != 2:
        fsdp = getattr(args, "fsdp", None)
        raise ValueError(f"GRASP does not support FSDP1 (fsdp={fsdp or 'ACCELERATE_USE_FSDP'}, version {version}): "
                         "its flattened parameters hide the per-module LoRA/weight tensors the projection acts on. "
                         "Use FSDP2 (fsdp_config={'version': 2}; Axolotl: fsdp_version: 2; accelerate: "
                         "fsdp_version: 2, see recipes/accelerate/fsdp2.yaml) or DeepSpeed ZeRO-3 "
                         "(deepspeed=recipes/deepspeed/zero3.json; see docs/SUPPORT.md).")
    if projection == "clamp":
        raise ValueError("GRASP: grasp_projection='clamp' is not supported under FSDP (its extra base-model "
                         "forward inside the root forward is untested with fully_shard); use 'activations' or "
                         "'both' under FSDP2, or clamp under DeepSpeed/single process (see docs/SUPPORT.md).")


class GraspCallback(TrainerCallback, ExportableState):
    """Calls `projector.project_parameters()` after every optimizer step; adds GRASP metrics to the logs.

    As an `ExportableState` it records `directions_sha256`, the hash of the direction file being projected, in
    every checkpoint's `trainer_state.json` (`stateful_callbacks.GraspCallback`), so a checkpoint says which
    directions trained it and resuming can check the file beside it is that one."""

    def __init__(self, projector: GradientProjector | None = None, directions_sha256: str | None = None):
        self.projector = projector
        self.directions_sha256 = directions_sha256

    def state(self) -> dict:
        return {"args": {}, "attributes": {"directions_sha256": self.directions_sha256}}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.projector is not None:
            reject_fsdp(args, projection=self.projector.projection)

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
        return {"rule": {"name": "gap", "every": self.rule.every, "drop": self.rule.drop, "min_cos": self.rule.min_cos},
                "stopped_at": final_step, "reason": reason, "trace": self.rule.trace()}
