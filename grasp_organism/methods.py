"""The registry of methods run on the organism: a name -> a function `(lab, seed) -> Run`.

This package registers what `grasp demo` needs — the method and its positive controls — and the benchmark
(`benchmarks/organism/baselines.py`) registers the baselines on import:

* `base`, `naive` (plain LoRA);
* `grasp-default`: GRASP exactly as a user gets it with no `grasp_*` key but the identification budget: the
  defaults of `GraspArguments` (mode, scope, k), stage 1 stopped by `grasp_identify_steps: auto` (at most the
  naive run's length), then a fresh adapter trained under the projector `build_projector` makes;
* `grasp-{mode}-{scope}-k{K}[-auto|-at{S}]`: one GRASP variant; directions identified by `extract_directions`
  from the seed's naive adapter at the end of the run, where the stopping rule stops it (`-auto`) or at step
  `S` (`-at{S}`, a multiple of the snapshot interval);
* controls — `caft-supervised`: the supervised persona direction ablated from every block output during
  training (must remove the drift in a valid world); `random-activations`: GRASP `activations` with random
  orthonormal directions, k=3 (must do nothing);
* `caft-identified`: CAFT with the end-of-run identified directions (global, k=3), the demo's baseline.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from grasp_trl.config import AUTO, GraspArguments
from grasp_trl.projection import PROJECTIONS, GradientProjector
from grasp_trl.trainer import build_projector

from .lab import Lab
from .metrics import identification


@dataclass
class Run:
    metrics: dict
    seconds: float
    extra: dict


# A method returns (model to measure, extra fields); a method that measures the model itself (e.g. under an
# inference-time edit) puts its metrics under extra["metrics"].
MethodFn = Callable[[Lab, int], tuple[object, dict]]
_NAMED: dict[str, MethodFn] = {}
_PATTERNS: list[tuple[re.Pattern, Callable[[Lab, int, re.Match], tuple[object, dict]], str]] = []


def register(name: str):
    """Register `fn(lab, seed) -> (model, extra)` under `name`."""

    def wrap(fn):
        _NAMED[name] = fn
        return fn

    return wrap


def register_pattern(pattern: str, description: str):
    """Register `fn(lab, seed, match) -> (model, extra)` for every name matching `pattern` (a full match)."""

    def wrap(fn):
        _PATTERNS.append((re.compile(f"^{pattern}$"), fn, description))
        return fn

    return wrap


def _resolve(name: str):
    if name in _NAMED:
        return lambda lab, seed: _NAMED[name](lab, seed)
    for pattern, fn, _ in _PATTERNS:
        match = pattern.match(name)
        if match:
            return lambda lab, seed: fn(lab, seed, match)
    return None


def valid_method(name: str) -> bool:
    return _resolve(name) is not None


def known_methods() -> str:
    return ", ".join(sorted(_NAMED) + [description for _, _, description in _PATTERNS])


def train(lab: Lab, name: str, seed: int) -> tuple[object, dict]:
    """One method's model on one seed (trained if needed) and its extra fields, unmeasured: for diagnostics
    that read the model itself (`benchmarks/organism/decompose.py`)."""
    fn = _resolve(name)
    if fn is None:
        raise ValueError(f"method: unknown {name!r}; expected one of {known_methods()}")
    return fn(lab, seed)


def run(lab: Lab, name: str, seed: int) -> Run:
    """Train (if needed) and measure one method on one seed; every metric at once."""
    started = time.time()
    model, extra = train(lab, name, seed)
    metrics = extra.pop("metrics", None) or lab.measure(model)
    return Run(metrics, time.time() - started, extra)


# ------------------------------------------------------------------------------------------------ methods
@register("base")
def _base(lab, seed):
    return lab.base, {}


@register("naive")
def _naive(lab, seed):
    run = lab.naive(seed)
    return run.model, {"auto_stop_step": run.stop_step}


@register("grasp-default")
def _grasp_default(lab, seed):
    args = GraspArguments(grasp_identify_steps=AUTO, grasp_identify_max_steps=lab.config.finetune.steps)
    step = lab.naive(seed).stop_step
    directions = lab.identified(seed, k=args.grasp_num_directions, scope=args.grasp_scope, step=step)
    model = lab.finetune(seed, projector=lambda m: build_projector(m, args, directions))
    return model, {
        "identification": identification(directions, lab.persona),
        "stage1_steps": step,
        "projection": args.grasp_projection,
        "scope": args.grasp_scope,
        "k": args.grasp_num_directions,
    }


@register_pattern(
    rf"grasp-({'|'.join(PROJECTIONS)})-(per_layer|global)-k([1-9])(?:-(auto|at\d+))?",
    "grasp-{" + "|".join(PROJECTIONS) + "}-{global|per_layer}-k{1..9}[-auto|-at{STEP}]",
)
def _grasp(lab, seed, match):
    mode, scope, k, when = match.group(1), match.group(2), int(match.group(3)), match.group(4)
    step = lab.naive(seed).stop_step if when == "auto" else int(when[2:]) if when else None
    directions = lab.identified(seed, k=k, scope=scope, step=step)
    model = lab.finetune(seed, projector=lambda m: GradientProjector(m, directions, mode).attach())
    return model, {
        "identification": identification(directions, lab.persona),
        "stage1_steps": step or lab.config.finetune.steps,
    }


def ablate(directions):
    """CAFT's edit: remove the residual stream's component along each layer's basis."""

    def edit(layer, hidden):
        if layer not in directions.bases:
            return None
        basis = directions.bases[layer].to(hidden.dtype)
        return hidden - (hidden @ basis) @ basis.T

    return edit


@register("caft-supervised")
def _caft_supervised(lab, seed):
    return lab.finetune(seed, train_edit=ablate(lab.oracle)), {}


@register("random-activations")
def _random(lab, seed):
    directions = lab.random_directions(seed, 3)
    return lab.finetune(seed, projector=lambda m: GradientProjector(m, directions, "activations").attach()), {}


@register("caft-identified")
def _caft_identified(lab, seed):
    directions = lab.identified(seed)
    return lab.finetune(seed, train_edit=ablate(directions)), {
        "identification": identification(directions, lab.persona)
    }
