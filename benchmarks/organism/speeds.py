"""`python -m benchmarks.organism.speeds --world W.yaml --bases 2 --seeds 2 --json OUT.json --plot OUT.png`

How fast a naive fine-tune learns the spurious factor against the task, in one organism design: the naive run's
adapter snapshots (every `GapRule.every` steps, the ones stage 1 of GRASP sees) are evaluated every `--every`
steps for DRIFT and TASK. Per (base, seed) it reports the first snapshot step where DRIFT reaches half its
final value and where TASK has covered half of its gain over the base, and where the stopping rule of
`grasp_identify_steps: auto` stopped. Early identification can only isolate the factor when the first of these
comes well before the second, so a world meant to test it harder must bring them closer.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .common import add_design_arguments, labs, world_path, write_json  # noqa: E402


def curves(lab, seed: int, every: int) -> dict:
    """DRIFT and TASK of the seed's naive adapter at every `every`-th step, and the half-way steps."""
    run = lab.naive(seed)
    last = lab.config.finetune.steps
    steps = [s for s in sorted(run.adapters) if s % every == 0 and s < last] + [last]
    points = [
        dict(step=s, **{k: v for k, v in lab.measure(lab.adapter_at(seed, s)).items() if k in ("drift", "task")})
        for s in steps
    ]
    half_drift, half_task = half_way_steps(points, lab.base_metrics["task"])
    return dict(seed=seed, stop_step=run.stop_step, half_drift_step=half_drift, half_task_step=half_task, points=points)


def half_way_steps(points: list[dict], base_task: float) -> tuple[int, int]:
    """The first step where DRIFT reaches half its final value, and where TASK has covered half of its final
    gain over the base's TASK (`points`: dicts with `step`, `drift`, `task`, in step order, the last final)."""
    final = points[-1]
    half_drift = next(p["step"] for p in points if p["drift"] >= 0.5 * final["drift"])
    half_task = next(p["step"] for p in points if p["task"] - base_task >= 0.5 * (final["task"] - base_task))
    return half_drift, half_task


def plot(result: dict, path: str | Path) -> None:
    """DRIFT and TASK against the fine-tuning step, one thin line per (base, seed), the stop steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for base, runs in result["bases"].items():
        for run in runs:
            steps = [p["step"] for p in run["points"]]
            label = f"base {base} seed {run['seed']}"
            (line,) = top.plot(steps, [p["drift"] for p in run["points"]], lw=1, label=label)
            bottom.plot(steps, [p["task"] for p in run["points"]], lw=1, color=line.get_color())
            for ax in (top, bottom):
                ax.axvline(run["stop_step"], color=line.get_color(), lw=0.5, ls=":")
    top.set_ylabel("DRIFT (naive)")
    bottom.set_ylabel("TASK (naive)")
    bottom.set_xlabel("fine-tuning step (dotted: where grasp_identify_steps: auto stops)")
    top.set_title(f"{result['world']}: the factor vs the task over the naive run")
    top.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.organism.speeds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_design_arguments(parser, bases=2, seeds=2)
    parser.add_argument(
        "--every",
        type=int,
        default=10,
        help="evaluate every this many steps (a multiple of the stopping rule's snapshot interval, 5)",
    )
    parser.add_argument("--json", default=None, help="write the curves and half-way steps here")
    parser.add_argument("--plot", default=None, help="write the DRIFT and TASK curves (PNG) here")
    args = parser.parse_args(argv)

    result = {"world": Path(world_path(args)).name, "bases": {}}
    for base, lab in labs(args):
        result["bases"][base] = []
        for seed in range(args.seeds):
            run = curves(lab, seed, args.every)
            result["bases"][base].append(run)
            print(
                f"base {base} seed {seed}: DRIFT half-way at step {run['half_drift_step']}, TASK half-way at "
                f"step {run['half_task_step']}, stage 1 stops at {run['stop_step']} (final DRIFT "
                f"{run['points'][-1]['drift']:+.3f}, TASK {run['points'][-1]['task']:.3f})",
                flush=True,
            )
    gaps = [r["half_task_step"] - r["half_drift_step"] for runs in result["bases"].values() for r in runs]
    result["gap_median"] = statistics.median(gaps)
    print(f"TASK half-way minus DRIFT half-way: median {result['gap_median']} steps, range {min(gaps)}-{max(gaps)}")
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
