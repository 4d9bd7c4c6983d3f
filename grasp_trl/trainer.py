"""`GraspSFTTrainer` / `GraspDPOTrainer`: TRL's trainers with identify-then-project as config options.

`GraspTrainerMixin` adds, on top of any TRL trainer:
* with `grasp_directions`: the projector attaches right after TRL built (and PEFT-wrapped) the model, so a
  wrong file fails before any step; the post-step projection runs through `GraspCallback`;
* with `grasp_identify_steps`: `train()` first runs a naive stage 1 in `output_dir/grasp_stage1`, extracts and
  saves the directions and the spectrum there, restores the adapter's initial values and the RNG state, and
  then runs stage 2 with projection — the same result as stage 2 run from the saved file with the same seed;
* the direction file is written into every checkpoint and the final output from the bytes read at install
  (a file rewritten on disk mid-run changes nothing), its sha256 is recorded in the trainer state, and
  resuming from a checkpoint reuses it (a checkpoint without it is an error); `grasp/leakage` and
  the removed gradient shares (`grasp/residual_grad_removed_fraction`, `grasp/weight_grad_removed_fraction`)
  join the normal logs (through `log`, before the reporting callbacks); the model card says GRASP was used,
  with the file's hash;
* everything checkable is checked at construction, before stage 1 trains: layers, module mapping, LoRA
  modules to identify from; stage 1 refuses to replace an existing `grasp_stage1/`.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from .callbacks import GapStoppingCallback, GraspCallback
from .config import AUTO, DIRECTIONS_FILENAME, STAGE1_DIRNAME, GraspArguments
from .deepspeed import forget_fp32_masters, update_params
from .directions import DirectionFileError, DirectionSet
from .drift import GraspDriftCallback, drift_callback_from_args
from .fsdp import reject_fsdp
from .identify import check_k_fits, identify_from
from .lora import residual_lora_modules
from .modules import check_target_modules, hidden_size, num_hidden_layers
from .projection import FORWARD_EDITS, GradientProjector
from .stopping import GapRule

logger = logging.getLogger(__name__)


@dataclass
class GraspSFTConfig(GraspArguments, SFTConfig):
    """`trl.SFTConfig` plus the `grasp_*` keys (see `GraspArguments`)."""


@dataclass
class GraspDPOConfig(GraspArguments, DPOConfig):
    """`trl.DPOConfig` plus the `grasp_*` keys (see `GraspArguments`)."""


def reject_liger_with_forward_edits(args, projection: str) -> None:
    """Raise, before any step, for `clamp`/`ablate` with `use_liger_kernel`: TRL's Liger DPO loss calls the
    decoder backbone directly, past the model-level hooks that decide which forwards the edit applies to, so
    the edit would be skipped or applied to the recomputation only (a wrong gradient)."""
    if projection in FORWARD_EDITS and getattr(args, "use_liger_kernel", False):
        raise ValueError(
            f"grasp_projection={projection}: not supported with use_liger_kernel=True (TRL's Liger loss calls the "
            "decoder backbone directly, bypassing the model-level hooks the edit is decided in); use "
            "'activations' or 'both', or set use_liger_kernel=False"
        )


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def build_projector(
    model, args: GraspArguments, directions: DirectionSet, *, grad_hooks: bool = True
) -> GradientProjector:
    """The projector the `grasp_*` keys describe, attached to `model` (used by the trainers and Axolotl).

    `grad_hooks=False` (the trainers without DeepSpeed) leaves the weight gradients to
    `project_gradients()`, which `GraspTrainerMixin.training_step` calls after backward."""
    if args.grasp_layers is not None:
        directions = directions.restricted_to(args.grasp_layers)
    return GradientProjector(
        model,
        directions,
        args.grasp_projection,
        args.grasp_sides,
        reader_layer=args.grasp_reader_layer,
        target_modules=args.grasp_target_modules,
        grad_hooks=grad_hooks,
    ).attach()


def check_layers(layers, model) -> None:
    """`grasp_layers` against the loaded model, before any training step (stage 1 included)."""
    count = num_hidden_layers(model)
    bad = sorted(l for l in layers or () if not 0 <= l < count)
    if bad:
        raise ValueError(f"grasp_layers: {bad} out of range for a model with {count} layers (0..{count - 1})")


class GraspTrainerMixin:
    """Adds GRASP to a TRL trainer whose `args` carry the `grasp_*` fields."""

    grasp_projector: GradientProjector | None = None
    grasp_callback: GraspCallback | None = None
    grasp_drift: GraspDriftCallback | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grasp_setup(self.args)

    def grasp_setup(self, grasp_args: GraspArguments) -> None:
        """Install GRASP as `grasp_args` describe. Called by `__init__`; the Axolotl plugin calls it on a
        trainer built by Axolotl after mixing this class in."""
        self.grasp_args = grasp_args
        self.grasp_callback = GraspCallback()
        self.add_callback(self.grasp_callback)
        self.grasp_drift = drift_callback_from_args(grasp_args)
        if self.grasp_drift is not None:
            self.add_callback(self.grasp_drift)
        self._grasp_initial_adapter = None
        if not grasp_args.grasp_enabled:
            return
        # fail at construction, before stage 1 or any FSDP wrapping
        reject_fsdp(self.args, getattr(self, "accelerator", None), grasp_args.grasp_projection)
        reject_liger_with_forward_edits(self.args, grasp_args.grasp_projection)
        self.grasp_callback.fsdp_checked = True
        check_target_modules(self.model, grasp_args.grasp_target_modules)
        if grasp_args.grasp_directions is not None:
            self._grasp_install(DirectionSet.load(grasp_args.grasp_directions))
        else:  # what a direction file's install checks, checked now: stage 1 would train before it
            check_layers(grasp_args.grasp_layers, self.model)
            if not hasattr(self.model, "peft_config"):
                raise ValueError(
                    "grasp_identify_steps needs a LoRA run to identify from (pass peft_config or a "
                    "PeftModel); for full fine-tuning, identify with a separate LoRA run and pass "
                    "grasp_directions"
                )
            self._grasp_check_identifiable()
            self._grasp_initial_adapter = {
                name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad
            }
            if any(value.is_meta for value in self._grasp_initial_adapter.values()):
                raise ValueError(
                    "grasp_identify_steps: the adapter is on the meta device on this rank (FSDP's "
                    "cpu_ram_efficient_loading), so stage 2 could not restart from its initial values; "
                    "set fsdp_cpu_ram_efficient_loading: false, or pass grasp_directions"
                )

    def _grasp_check_identifiable(self) -> None:
        """What stage 1's identification and stage 2's install would refuse, refused before stage 1 trains: no
        LoRA module to identify from, `k` above the LoRA rank available, `weights` with nothing to constrain."""
        grasp_args = self.grasp_args
        modules = residual_lora_modules(
            self.model, include_readers=grasp_args.grasp_include_readers, target_modules=grasp_args.grasp_target_modules
        )
        if not modules:
            side = "writer or reader" if grasp_args.grasp_include_readers else "writer (o_proj/down_proj-like)"
            raise ValueError(
                f"grasp_identify_steps: the LoRA has no {side} module in a decoder block, so "
                "stage 1 would have nothing to identify from; expected LoRA target_modules "
                "including them (or grasp_include_readers: true)"
            )
        ranks: dict[int, int] = {}
        for _, module, adapter, layer, _ in modules:
            ranks[layer] = ranks.get(layer, 0) + module.r[adapter]  # not the weight: ZeRO-3 may have sharded it
        rank, where = (
            (sum(ranks.values()), "the stacked update")
            if grasp_args.grasp_scope == "global"
            else min((r, f"block {l}") for l, r in ranks.items())
        )
        if grasp_args.grasp_energy is None:
            check_k_fits(grasp_args.grasp_num_directions, rank, f"grasp_num_directions: {where}")
        placeholder = DirectionSet.random(
            hidden_size(self.model), num_hidden_layers(self.model), 1, layers=grasp_args.grasp_layers
        )
        GradientProjector(
            self.model,
            placeholder,
            grasp_args.grasp_projection,
            grasp_args.grasp_sides,
            reader_layer=grasp_args.grasp_reader_layer,
            target_modules=grasp_args.grasp_target_modules,
        ).check_constrainable()

    # --------------------------------------------------------------------------------------- projection
    def _grasp_install(self, directions: DirectionSet) -> None:
        directions.validate_for(self.model)
        if directions.is_empty:  # a null control can be meant; it must not look like a GRASP run
            warnings.warn(
                f"{directions.source}: the direction file holds no direction: training WITHOUT GRASP "
                "(nothing projected, no direction file in the outputs, no GRASP model card)",
                stacklevel=2,
            )
            return
        if self.grasp_projector is not None:
            self.grasp_projector.detach()
        self.grasp_directions = directions
        self.grasp_callback.directions_sha256 = directions.sha256
        # DeepSpeed consumes gradients inside backward: only per-parameter hooks see them there
        self.grasp_projector = build_projector(
            self.model, self.grasp_args, directions, grad_hooks=self.is_deepspeed_enabled
        )
        self.grasp_callback.projector = self.grasp_projector
        if self.grasp_drift is not None and self.grasp_drift.directions is None:
            self.grasp_drift.directions = directions
        logger.info("GRASP: projecting %s (%s mode)", directions, self.grasp_args.grasp_projection)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self.grasp_callback is not None:
            logs.update(self.grasp_callback.metrics())
        if self.grasp_drift is not None:
            logs.update(self.grasp_drift.metrics())
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------------------------------- training
    def training_step(self, *args, **kwargs):
        """The parent's forward/backward; then, at a gradient-accumulation boundary (before clipping and the
        optimizer step), the batched projection of the weight gradients."""
        loss = super().training_step(*args, **kwargs)
        if self.grasp_projector is not None and self.accelerator.sync_gradients:
            self.grasp_projector.project_gradients()
        return loss

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = self._grasp_resolve_checkpoint(resume_from_checkpoint)
        saved = Path(checkpoint) / DIRECTIONS_FILENAME if checkpoint else None
        if saved is not None and saved.is_file():
            self._grasp_resume_directions(saved)
        elif (
            saved is not None
            and self.grasp_args.grasp_enabled
            and (self.grasp_projector is not None or self._grasp_initial_adapter is not None)
        ):
            raise DirectionFileError(
                f"{checkpoint}: no {DIRECTIONS_FILENAME}: the checkpoint does not record the "
                "directions it was trained with; expected it beside the checkpoint (copy it "
                "back from the run's output), or resume without GRASP"
            )
        elif self._grasp_initial_adapter is not None and self.grasp_projector is None:
            self._grasp_stage1()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _grasp_resolve_checkpoint(self, resume_from_checkpoint):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            return get_last_checkpoint(self.args.output_dir)
        return resume_from_checkpoint or None

    def _grasp_resume_directions(self, saved: Path) -> None:
        directions = DirectionSet.load(saved)
        recorded = _recorded_sha256(saved.parent)
        if recorded is not None and recorded != directions.sha256:
            raise DirectionFileError(
                f"{saved}: sha256 {directions.sha256[:12]}..., but the checkpoint's "
                f"trainer_state.json records {recorded[:12]}... as the directions projected; "
                "the file beside the checkpoint was replaced"
            )
        if self.grasp_projector is not None:
            current = self.grasp_directions.bases
            same = current.keys() == directions.bases.keys() and all(
                torch.equal(current[l], directions.bases[l]) for l in current
            )
            if not same:
                raise DirectionFileError(
                    f"{saved}: the checkpoint was trained with other directions than "
                    f"grasp_directions={self.grasp_args.grasp_directions}"
                )
            return
        self._grasp_install(directions)

    def _grasp_stage1(self) -> None:
        """Naive LoRA for `grasp_identify_steps` steps (or until the stopping rule fires, with `auto`), then
        identify, reset adapter/optimizer/RNG."""
        args, grasp_args = self.args, self.grasp_args
        stage1_dir = Path(args.output_dir) / STAGE1_DIRNAME
        if (stage1_dir / DIRECTIONS_FILENAME).exists() or (stage1_dir / "adapter_model.safetensors").exists():
            raise FileExistsError(
                f"{stage1_dir}: holds a finished stage 1 (its adapter and directions) that this "
                "run would replace; expected a new output_dir, resume_from_checkpoint, or "
                f"grasp_directions={stage1_dir / DIRECTIONS_FILENAME} to reuse it"
            )
        auto = grasp_args.grasp_identify_steps == AUTO
        budget = grasp_args.grasp_identify_max_steps if auto else grasp_args.grasp_identify_steps
        overrides = {
            "max_steps": args.max_steps if budget is None else budget,
            "output_dir": str(stage1_dir),
            "save_strategy": "no",
            "push_to_hub": False,
            "load_best_model_at_end": False,
        }
        saved_values = {key: getattr(args, key) for key in overrides}
        rng = _rng_state()
        timing = (
            GapStoppingCallback(
                self.model, GapRule(every=grasp_args.grasp_identify_every), grasp_args.grasp_target_modules
            )
            if auto
            else None
        )
        logger.warning(
            "GRASP stage 1/2: naive LoRA for %s -> %s",
            "at most the run's length, stopped by the gap rule"
            if auto and budget is None
            else f"{budget} steps" + (" at most" if auto else ""),
            stage1_dir,
        )
        try:
            for key, value in overrides.items():
                setattr(args, key, value)
            if timing is not None:
                self.add_callback(timing)
            super().train()
            self.save_model(str(stage1_dir))  # through the trainer: gathers ZeRO-3 shards
            stopping = timing.report(self.state.global_step) if timing is not None else None
            if stopping is not None:
                logger.warning("GRASP stage 1 stopped at %s", stopping["reason"])
            if args.should_save:
                (stage1_dir / "log_history.json").write_text(json.dumps(self.state.log_history, indent=1))
                identify_from(stage1_dir, grasp_args, num_hidden_layers(self.model), stopping)
            self.accelerator.wait_for_everyone()
            directions = DirectionSet.load(stage1_dir / DIRECTIONS_FILENAME)
        finally:
            if timing is not None:
                self.remove_callback(timing)
            for key, value in saved_values.items():
                setattr(args, key, value)
        initial = self._grasp_initial_adapter  # written into DeepSpeed's fp32 masters too, where they exist
        update_params(
            [
                (param, lambda _, value=initial[name]: value)
                for name, param in self.model.named_parameters()
                if name in initial
            ]
        )
        if self.is_deepspeed_enabled:  # stage 2 builds its own engine: destroy stage 1's, and its links
            self.accelerator.free_memory()
            forget_fp32_masters(self.model.parameters())
            self.model_wrapped = self.model
        self.optimizer, self.lr_scheduler = None, None
        _set_rng_state(rng)
        self._grasp_install(directions)
        logger.warning(
            "GRASP stage 2/2: training with %s projected out (%s mode)", directions, grasp_args.grasp_projection
        )

    # ------------------------------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.grasp_projector is not None and self.args.should_save:  # from memory: what was projected
            self.grasp_directions.write_recorded(Path(output_dir or self.args.output_dir) / DIRECTIONS_FILENAME)

    def create_model_card(self, *args, tags=None, **kwargs):
        """The parent's model card plus a GRASP section. Arguments pass through: TRL's trainers take
        `model_name`/`dataset_name`, `transformers.Trainer` (Axolotl's SFT trainer) `model_name`/`dataset_tags`."""
        tags = list([tags] if isinstance(tags, str) else tags or [])
        if self.grasp_projector is not None:
            tags.append("grasp")
        super().create_model_card(*args, tags=tags, **kwargs)
        card = Path(self.args.output_dir) / "README.md"
        if self.grasp_projector is None or not self.is_world_process_zero() or not card.is_file():
            return
        digest = self.grasp_directions.sha256
        ks = {l: self.grasp_directions.k(l) for l in self.grasp_directions.bases}
        card.write_text(
            card.read_text()
            + (
                "\n\n## GRASP\n\nTrained with GRASP (GRadient projection of Associated Spurious Patterns, "
                "arXiv 2605.27676): the directions below were projected out of the learning signal "
                f"(`grasp_projection={self.grasp_args.grasp_projection}`).\n\n"
                f"- direction file: `{DIRECTIONS_FILENAME}` (sha256 `{digest}`)\n"
                f"- source: {self.grasp_directions.metadata.get('source_adapter', self.grasp_directions.source)}\n"
                f"- scope: {self.grasp_directions.metadata.get('scope', '?')}, k per layer: {ks}\n"
            )
        )


def _recorded_sha256(checkpoint: Path) -> str | None:
    """The direction file's sha256 a checkpoint's `trainer_state.json` records (None for older checkpoints)."""
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return None
    entry = json.loads(state.read_text()).get("stateful_callbacks", {}).get("GraspCallback") or {}
    return (entry.get("attributes") or {}).get("directions_sha256")


class GraspSFTTrainer(GraspTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` with GRASP; configure it with `GraspSFTConfig`."""


class GraspDPOTrainer(GraspTrainerMixin, DPOTrainer):
    """`trl.DPOTrainer` with GRASP; configure it with `GraspDPOConfig`."""
