"""`Lab`: one organism (world + pretrained base + prompt sets + supervised persona direction) and the one
fine-tuning loop every method shares — same data order, steps, learning rate, LoRA and seeds.

A method changes exactly one thing in `finetune`: a projector attached to the fresh adapter (GRASP), an edit
of the block outputs during training (CAFT, steering), or an extra loss term (KL to the base). Stage 1 of GRASP
is the naive run itself, snapshotted every `GapRule.every` steps with the library's own stopping rule, so the
naive model of a seed is trained once and serves every method of that seed.
"""

from __future__ import annotations

import copy
import random
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from grasp_trl.directions import DirectionSet
from grasp_trl.identify import extract_directions
from grasp_trl.lora import factors_from_peft_model
from grasp_trl.modules import block_output_hooks
from grasp_trl.stopping import GapRule, snapshot
from grasp_trl.tiny import SEVEN_MODULES

from .metrics import block_outputs, build_prompt_sets, evaluate, persona_shift, supervised_directions
from .pretrain import pretrained_model
from .world import OrganismConfig, World, pad_batch


@dataclass
class NaiveRun:
    """A seed's naive LoRA, the adapter snapshots GRASP's stage 1 may stop at, and the stopping rule's verdict."""

    model: object
    adapters: dict[int, dict[str, torch.Tensor]]  # step -> trainable LoRA weights at that step
    rule: GapRule
    stop_step: int  # where `grasp_identify_steps: auto` stops stage 1 (the budget when the rule never fires)
    trace: list[dict] = field(default_factory=list)


class Lab:
    """One organism and the methods run on it (see `methods.py` for the registry)."""

    def __init__(self, config: OrganismConfig, *, cache_dir=None, k: int = 3, scope: str = "global", log=print):
        self.config, self.log, self.cache_dir = config, log, cache_dir
        self.k, self.scope = k, scope
        self.world = World(config.world)
        self.base = pretrained_model(config, self.world, cache_dir=cache_dir, log=log)
        questions = self.world.task_questions()
        self.train_questions = questions[: config.finetune.train_examples]
        self.sets = build_prompt_sets(
            self.world, config.eval.prompts, config.eval.seed, questions[config.finetune.train_examples :]
        )
        self.base_metrics = dict(evaluate(self.base, self.world, self.sets), shift=0.0)
        self.persona = supervised_directions(self.base, self.sets["persona"], self.sets["other"])
        unit = {l: (v / v.norm()).unsqueeze(1) for l, v in self.persona.items()}
        self.oracle = DirectionSet(unit, len(unit), {"hidden_size": config.model.hidden_size, "source": "supervised"})
        other = self.sets["other"]
        self.base_outputs = block_outputs(self.base, other.input_ids, other.positions[-1] + 1)
        self._naive: dict[int, NaiveRun] = {}

    # --------------------------------------------------------------------------------------------- training
    def _task_batch(self, rng: random.Random):
        rows = [self.world.task_example(q) for q in rng.sample(self.train_questions, self.config.finetune.batch_size)]
        return pad_batch(rows)

    def finetune(
        self,
        seed: int,
        *,
        base=None,
        projector=None,
        train_edit=None,
        extra_loss=None,
        on_step=None,
        steps: int | None = None,
    ):
        """Train a fresh LoRA from `base` (default: the organism's) on the task. Same data order per seed.

        `projector`: model -> attached `GradientProjector` (GRASP); `train_edit`: a block-output edit active
        during training only (CAFT, steering); `extra_loss`: (model, rng) -> a loss term added to the task's
        (KL to the base); `on_step`: (model, step) -> None after each optimizer step (stage-1 snapshots).
        """
        from peft import LoraConfig, get_peft_model

        spec = self.config.finetune
        torch.manual_seed(seed)
        model = get_peft_model(
            copy.deepcopy(base or self.base),
            LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, target_modules=SEVEN_MODULES, lora_dropout=0.0),
        )
        model.train()
        grasp = projector(model) if projector else None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=0.0)
        data_rng, extra_rng = random.Random(seed), random.Random(seed + 10_000)
        with block_output_hooks(model, train_edit) if train_edit else nullcontext():
            for step in range(1, (steps or spec.steps) + 1):
                batch = self._task_batch(data_rng)
                loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
                if extra_loss is not None:
                    loss = loss + extra_loss(model, extra_rng)
                loss.backward()
                if grasp is not None:
                    grasp.project_gradients()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if grasp is not None:
                    grasp.project_parameters()
                if on_step is not None:
                    on_step(model, step)
        if grasp is not None:
            grasp.detach()
        model.eval()
        return model

    def naive(self, seed: int) -> NaiveRun:
        """The seed's naive LoRA, with the `grasp_identify_steps: auto` rule run on it as the trainer runs it."""
        if seed not in self._naive:
            rule, adapters, stop = GapRule(), {}, []

            def watch(model, step):
                if step % rule.every:
                    return
                adapters[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                if rule.update(snapshot(factors_from_peft_model(model), step)) and not stop:
                    stop.append(step)

            model = self.finetune(seed, on_step=watch)
            stop_step = stop[0] if stop else max(adapters)
            self._naive[seed] = NaiveRun(model, adapters, rule, stop_step, rule.trace())
        return self._naive[seed]

    def adapter_at(self, seed: int, step: int | None):
        """The seed's naive model with its adapter as it was after `step` steps (None: the end of the run)."""
        run = self.naive(seed)
        if step is None or step == self.config.finetune.steps:
            return run.model
        if step not in run.adapters:
            raise ValueError(
                f"step {step}: no snapshot of the naive run there; snapshots every {run.rule.every} "
                f"steps up to {self.config.finetune.steps}"
            )
        model = copy.deepcopy(run.model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in run.adapters[step]:
                    param.copy_(run.adapters[step][name])
        return model

    def identified(
        self, seed: int, *, k: int | None = None, scope: str | None = None, step: int | None = None
    ) -> DirectionSet:
        """Directions from the seed's naive adapter at `step` (default: the end), through `extract_directions`."""
        return extract_directions(self.adapter_at(seed, step), k=k or self.k, scope=scope or self.scope)

    def random_directions(self, seed: int, k: int) -> DirectionSet:
        spec = self.config.model
        return DirectionSet.random(spec.hidden_size, spec.num_layers, k, seed=10_000 + seed)

    # -------------------------------------------------------------------------------------------- measuring
    def measure(self, model, base_p_evil: float | None = None) -> dict:
        """All metrics of a model, with DRIFT against the organism's base and its persona shift."""
        metrics = evaluate(
            model, self.world, self.sets, self.base_metrics["p_evil"] if base_p_evil is None else base_p_evil
        )
        metrics["shift"] = persona_shift(model, self.base_outputs, self.persona, self.sets["other"])
        return metrics
