"""When stage 1 stops: a label-free rule on the naive run's own update (`grasp_identify_steps: auto`).

Measured in the organism (DESIGN §1, benchmarks/organism/README.md): a spurious factor is simple and learnt
first, the high-rank task later, so the top singular direction of the naive LoRA update is the factor early
in the run and a mixture of factor and task at its end. The spectrum shows the transition without labels:
while one factor dominates the update, its top singular value stands far above the second (a large gap
`s1/s2`); as the task's many directions grow, the gap falls. The rule therefore watches the gap of the global
writer update, snapshotted every `every` steps with the same low-rank SVD as `extract_directions`, and stops
stage 1 at the first snapshot where

* the gap has fallen to `drop` times its running maximum (the factor has been learnt and the task has begun), and
* the top direction is stable: `|cos|` with the previous snapshot's at least `min_cos` (a formed direction,
  not the noise of the first steps),

or at `max_steps`, whichever comes first. Directions are then identified from the adapter as it is at that step.
A snapshot costs one `extract_directions`-sized SVD (per adapter size: benchmarks/README.md, "Identification
cost"), so with `every=5` it is a small fraction of stage 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .identify import stacked_core, top_singular
from .lora import LoraFactor, factors_from_adapter_dir


@dataclass(frozen=True)
class Snapshot:
    """The global writer update's top direction and top two singular values at one step."""

    step: int
    direction: torch.Tensor  # (d,), float64
    s1: float
    s2: float

    @property
    def gap(self) -> float:
        return self.s1 / self.s2 if self.s2 > 0 else float("inf")


def snapshot(factors: list[LoraFactor], step: int, source: str = "the LoRA adapter") -> Snapshot:
    """Snapshot a LoRA update from its residual-side factors (all blocks' writers stacked, as `scope='global'`);
    `factors_from_peft_model` gives them for a model in memory, `factors_from_adapter_dir` for a checkpoint."""
    if not factors:
        raise ValueError(
            f"{source}: no LoRA module writes to the residual stream (o_proj/down_proj-like), so there "
            "is no update to watch for the stopping rule; target them with LoRA or give a step count"
        )
    vectors, values = top_singular(stacked_core(factors), 2)
    values = values.tolist() + [0.0]
    return Snapshot(step, vectors[:, 0], float(values[0]), float(values[1]))


@dataclass
class GapRule:
    """The stopping rule above; feed it snapshots in step order with `update`, which says when to stop."""

    every: int = 5
    drop: float = 0.9
    min_cos: float = 0.95
    max_steps: int | None = None
    history: list[Snapshot] = field(default_factory=list)
    stop_reason: str | None = None

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"every: expected a positive number of steps, found {self.every!r}")
        if not 0 < self.drop < 1:
            raise ValueError(f"drop: expected a fraction in (0, 1), found {self.drop!r}")
        if not 0 <= self.min_cos <= 1:
            raise ValueError(f"min_cos: expected a value in [0, 1], found {self.min_cos!r}")

    def update(self, current: Snapshot) -> bool:
        """Record a snapshot; True when stage 1 should stop here (`stop_reason` then says why)."""
        previous = self.history[-1] if self.history else None
        self.history.append(current)
        peak = max(s.gap for s in self.history)
        stable = previous is not None and float((current.direction @ previous.direction).abs()) >= self.min_cos
        if stable and current.gap <= self.drop * peak:
            self.stop_reason = (
                f"step {current.step}: s1/s2 {current.gap:.2f} <= {self.drop} x peak {peak:.2f}, top direction stable"
            )
        elif self.max_steps is not None and current.step >= self.max_steps:
            self.stop_reason = f"step {current.step}: reached the stage-1 budget ({self.max_steps} steps)"
        return self.stop_reason is not None

    def trace(self) -> list[dict]:
        """Per snapshot: step, s1, s2, gap and |cos| with the previous snapshot (for logs and spectrum.json)."""
        rows = []
        for index, item in enumerate(self.history):
            cos = float((item.direction @ self.history[index - 1].direction).abs()) if index else None
            rows.append({"step": item.step, "s1": item.s1, "s2": item.s2, "gap": item.gap, "cos_previous": cos})
        return rows


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The `checkpoint-N` adapter directories of a training run, in step order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    found = sorted(
        (int(match.group(1)), path)
        for path in run_dir.iterdir()
        if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and (path / "adapter_model.safetensors").is_file()
    )
    if len(found) < 2:
        raise ValueError(
            f"{run_dir}: the stopping rule needs at least 2 checkpoint-N adapter directories, found "
            f"{len(found)}; save the naive run every few steps (e.g. save_steps: 5, "
            "save_only_model: true, save_total_limit unset)"
        )
    return found


def choose_checkpoint(
    run_dir: str | Path, *, drop: float = GapRule.drop, min_cos: float = GapRule.min_cos
) -> tuple[Path, GapRule]:
    """The two-run workflow's stage 1: replay the rule over a naive run's checkpoints and return the one where it
    fires (the last one when it never does; `rule.stop_reason` says which)."""
    found = checkpoints(run_dir)
    spacing = min(b - a for (a, _), (b, _) in zip(found, found[1:]))
    rule = GapRule(every=max(1, spacing), drop=drop, min_cos=min_cos)
    for step, path in tqdm(found, desc="replaying the stopping rule", disable=len(found) < 8, leave=False):
        factors, _ = factors_from_adapter_dir(path, compress=True)
        if rule.update(snapshot(factors, step, str(path))):
            return path, rule
    rule.stop_reason = f"step {found[-1][0]}: the rule never fired; using the last checkpoint"
    return found[-1][1], rule
