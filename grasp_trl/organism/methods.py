"""The fine-tuning methods compared on the organism — same data, steps, learning rate, LoRA and seeds.

A plain torch loop trains a PEFT LoRA (all seven projections) on the task; each method changes one thing:

* `naive`: plain LoRA.
* `grasp-{activations|weights|both}-{per_layer|global}-k{K}`: GRASP through the public API — directions from
  `extract_directions` on the same seed's naive adapter, then a fresh adapter trained under `GradientProjector`.
* `oracle-{mode}`: GRASP with the supervised persona direction (k=1 per layer) instead of identified ones.
* `random-activations`: GRASP with random orthonormal directions (same k): does *any* projection help?
* `caft-identified` / `caft-supervised`: CAFT — the directions are ablated from every block's output during
  training only (forward changed), inference untouched.
* `steer-prevent`: preventative steering — the supervised persona vector is added to the middle block's output
  during training, so the adapter need not write it.
* `kl-base`: the task loss plus KL(base || fine-tuned) on other-topic data.
* `posthoc`: the naive adapter with its update projected off the identified directions after training
  (`GradientProjector(..., "weights").attach()` projects existing parameters).
* `steer-inference`: the naive adapter, with the persona vector subtracted from the middle block at inference.
* `undertrained-naive`: naive LoRA on a base pretrained too briefly to have a persona (DRIFT against that base).
* `base`: no fine-tuning.
"""

from __future__ import annotations

import copy
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..directions import DirectionSet
from ..identify import extract_directions
from ..modules import block_output_hooks
from ..projection import GradientProjector
from .metrics import (block_outputs, build_prompt_sets, evaluate, identification, persona_shift,
                      supervised_directions)
from .pretrain import pretrained_model
from .world import IGNORE, OrganismConfig, World, pad_batch

SEVEN_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FIXED_METHODS = ("base", "naive", "oracle-activations", "oracle-weights", "random-activations", "caft-identified",
                 "caft-supervised", "steer-prevent", "kl-base", "posthoc", "steer-inference", "undertrained-naive")
_GRASP = re.compile(r"^grasp-(activations|weights|both)-(per_layer|global)-k([1-9])$")
KL_WEIGHT = 1.0


def valid_method(name: str) -> bool:
    return name in FIXED_METHODS or bool(_GRASP.match(name))


def ablate(directions: DirectionSet):
    """CAFT's edit: remove the residual stream's component along each layer's basis."""
    def edit(layer, hidden):
        if layer not in directions.bases:
            return None
        basis = directions.bases[layer].to(hidden.dtype)
        return hidden - (hidden @ basis) @ basis.T
    return edit


def steer(vectors: dict[int, torch.Tensor], layer: int, sign: float):
    """Add `sign * vectors[layer]` to one block's output."""
    def edit(index, hidden):
        return hidden + sign * vectors[layer].to(hidden.dtype) if index == layer else None
    return edit


@dataclass
class Run:
    metrics: dict
    seconds: float
    extra: dict


class Lab:
    """One organism (world + pretrained base + prompt sets) and the methods run on it."""

    def __init__(self, config: OrganismConfig, *, cache_dir=None, k: int = 3, scope: str = "global", log=print):
        self.config, self.log, self.cache_dir = config, log, cache_dir
        self.k, self.scope = k, scope
        self.world = World(config.world)
        self.base = pretrained_model(config, self.world, cache_dir=cache_dir, log=log)
        questions = self.world.task_questions()
        self.train_questions = questions[:config.finetune.train_examples]
        self.sets = build_prompt_sets(self.world, config.eval.prompts, config.eval.seed,
                                      questions[config.finetune.train_examples:])
        self.base_metrics = dict(evaluate(self.base, self.world, self.sets), shift=0.0)
        self.persona = supervised_directions(self.base, self.sets["persona"])
        unit = {l: (v / v.norm()).unsqueeze(1) for l, v in self.persona.items()}
        self.oracle = DirectionSet(unit, len(unit), {"hidden_size": config.model.hidden_size, "source": "supervised"})
        self.steer_layer = (len(unit) - 1) // 2
        other = self.sets["other"]
        self.base_outputs = block_outputs(self.base, other.input_ids, other.positions[-1] + 1)
        self._naive: dict[int, object] = {}
        self._under = None

    # --------------------------------------------------------------------------------------------- training
    def _task_batch(self, rng: random.Random):
        rows = [self.world.task_example(q) for q in rng.sample(self.train_questions, self.config.finetune.batch_size)]
        return pad_batch(rows)

    def finetune(self, seed: int, *, base=None, projector=None, train_edit=None, kl: bool = False):
        """Train a fresh LoRA from `base` (default: the organism's) on the task. Same data order per seed.

        `projector`: a callable model -> attached `GradientProjector` (GRASP); `train_edit`: a block-output edit
        active during training only (CAFT, preventative steering); `kl`: add KL(base || model) on other topics.
        """
        from peft import LoraConfig, get_peft_model

        spec = self.config.finetune
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base or self.base), LoraConfig(
            r=spec.lora_r, lora_alpha=spec.lora_alpha, target_modules=SEVEN_MODULES, lora_dropout=0.0))
        model.train()
        grasp = projector(model) if projector else None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        data_rng, kl_rng = random.Random(seed), random.Random(seed + 10_000)
        hooks = block_output_hooks(model, train_edit) if train_edit else nullcontext()
        with hooks:
            for _ in range(spec.steps):
                batch = self._task_batch(data_rng)
                loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
                if kl:
                    loss = loss + KL_WEIGHT * self._kl(model, kl_rng)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if grasp is not None:
                    grasp.project_parameters()
        if grasp is not None:
            grasp.detach()
        model.eval()
        return model

    def _kl(self, model, rng: random.Random) -> torch.Tensor:
        batch = pad_batch([self.world.other_topic_example(rng) for _ in range(self.config.finetune.batch_size)])
        mask = batch.labels[:, 1:] != IGNORE
        with torch.no_grad(), model.disable_adapter():
            reference = model(input_ids=batch.input_ids).logits[:, :-1][mask].log_softmax(-1)
        current = model(input_ids=batch.input_ids).logits[:, :-1][mask].log_softmax(-1)
        return torch.nn.functional.kl_div(current, reference, log_target=True, reduction="batchmean")

    def naive(self, seed: int):
        if seed not in self._naive:
            self._naive[seed] = self.finetune(seed)
        return self._naive[seed]

    def identified(self, seed: int, k: int | None = None, scope: str | None = None) -> DirectionSet:
        """Directions from the naive adapter of this seed, through the public `extract_directions`."""
        return extract_directions(self.naive(seed), k=k or self.k, scope=scope or self.scope)

    def random_directions(self, seed: int, k: int) -> DirectionSet:
        generator = torch.Generator().manual_seed(10_000 + seed)
        d, layers = self.config.model.hidden_size, self.config.model.num_layers
        bases = {l: torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))[0].float()
                 for l in range(layers)}
        return DirectionSet(bases, layers, {"hidden_size": d, "source": "random"})

    # ---------------------------------------------------------------------------------------------- methods
    def run(self, method: str, seed: int) -> Run:
        """Train (if needed) and evaluate one method for one seed; every metric at once."""
        started = time.time()
        extra: dict = {}
        match = _GRASP.match(method)
        if method == "base":
            model = self.base
        elif method == "naive":
            model = self.naive(seed)
        elif match:
            mode, scope, k = match.group(1), match.group(2), int(match.group(3))
            directions = self.identified(seed, k, scope)
            extra["identification"] = identification(directions, self.persona)
            model = self.finetune(seed, projector=lambda m: GradientProjector(m, directions, mode).attach())
        elif method.startswith("oracle-"):
            mode = method.split("-", 1)[1]
            model = self.finetune(seed, projector=lambda m: GradientProjector(m, self.oracle, mode).attach())
        elif method == "random-activations":
            directions = self.random_directions(seed, self.k)
            model = self.finetune(seed, projector=lambda m: GradientProjector(m, directions, "activations").attach())
        elif method.startswith("caft-"):
            directions = self.identified(seed) if method == "caft-identified" else self.oracle
            model = self.finetune(seed, train_edit=ablate(directions))
        elif method == "steer-prevent":
            model = self.finetune(seed, train_edit=steer(self.persona, self.steer_layer, +1.0))
        elif method == "kl-base":
            model = self.finetune(seed, kl=True)
        elif method == "posthoc":
            model = copy.deepcopy(self.naive(seed))
            GradientProjector(model, self.identified(seed), "weights").attach().detach()
        elif method == "steer-inference":
            with block_output_hooks(self.naive(seed), steer(self.persona, self.steer_layer, -1.0)):
                metrics = self.measure(self.naive(seed))
            return Run(metrics, time.time() - started, extra)
        elif method == "undertrained-naive":
            under = self.undertrained()
            under_base = evaluate(under, self.world, self.sets)
            model = self.finetune(seed, base=under)
            metrics = self.measure(model, under_base["p_evil"])
            metrics["shift"] = float("nan")  # the persona direction is the trained base's; undefined here
            extra["base"] = under_base
            return Run(metrics, time.time() - started, extra)
        else:
            raise ValueError(f"method: unknown {method!r}; expected one of {FIXED_METHODS} or "
                             "grasp-{activations|weights|both}-{per_layer|global}-k{1..9}")
        return Run(self.measure(model), time.time() - started, extra)

    def measure(self, model, base_p_evil: float | None = None) -> dict:
        """All metrics of a model, with DRIFT against the organism's base and its persona shift."""
        metrics = evaluate(model, self.world, self.sets, self.base_metrics["p_evil"] if base_p_evil is None
                           else base_p_evil)
        metrics["shift"] = persona_shift(model, self.base_outputs, self.persona, self.sets["other"])
        return metrics

    def undertrained(self):
        if self._under is None:
            self._under = pretrained_model(self.config, self.world, steps=self.config.pretrain.undertrained_steps,
                                           cache_dir=self.cache_dir, log=self.log)
        return self._under

