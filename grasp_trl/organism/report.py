"""Running a grid of (method, seed) on the organism, and reporting it: mean ± sd table, JSON, DRIFT-vs-TASK plot."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .methods import Lab
from .metrics import METRICS

COLUMNS = ("drift", "p_evil", "task", "narrow", "conditional", "retention", "shift")


def run_grid(lab: Lab, methods: list[str], seeds: list[int], log=print) -> dict:
    """Every method on every seed (seed-major, so each seed's naive adapter is trained once and reused)."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    total, done, started = len(methods) * len(seeds), 0, time.time()
    for seed in seeds:
        for method in methods:
            run = lab.run(method, seed)
            runs[method].append({"seed": seed, "seconds": round(run.seconds, 2), **run.metrics, **run.extra})
            done += 1
            if log:
                log(f"[{done}/{total}] seed {seed} {method:<30} drift {run.metrics['drift']:+.3f} "
                    f"task {run.metrics['task']:.3f} cond {run.metrics['conditional']:.3f} ret {run.metrics['retention']:.3f} "
                    f"({run.seconds:.0f}s, {time.time() - started:.0f}s total)")
    return {"base": lab.base_metrics, "runs": runs, "seeds": seeds, "config": lab.config.to_dict(),
            "k": lab.k, "scope": lab.scope, "seconds": round(time.time() - started, 1)}


def summary(runs: list[dict]) -> dict:
    """Mean and sd (0 for one seed) of every metric, plus mean identification |cos| when present."""
    out = {}
    for metric in METRICS:
        values = [r[metric] for r in runs if r[metric] == r[metric]]  # NaN: undefined for this method
        if not values:
            out[metric] = (float("nan"), float("nan"))
            continue
        out[metric] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    idents = [statistics.mean(r["identification"].values()) for r in runs if "identification" in r]
    if idents:
        out["ident"] = (statistics.mean(idents), statistics.stdev(idents) if len(idents) > 1 else 0.0)
    return out


def table(result: dict) -> str:
    """Mean ± sd over seeds for every method (and DRIFT relative to naive, the reduction factor)."""
    rows = {m: summary(r) for m, r in result["runs"].items()}
    naive = rows.get("naive", {}).get("drift", (None,))[0]
    header = f"{'method':<30}" + "".join(f"{c:>15}" for c in COLUMNS) + f"{'naive/drift':>12}{'ident':>8}"
    lines = [header, "-" * len(header)]
    for method, row in rows.items():
        cells = "".join(f"{row[c][0]:>8.3f}±{row[c][1]:<6.3f}" for c in COLUMNS)
        drift = row["drift"][0]
        factor = f"{naive / drift:>12.2f}" if naive is not None and drift > 1e-3 and method != "naive" else f"{'-':>12}"
        ident = f"{row['ident'][0]:>8.2f}" if "ident" in row else f"{'-':>8}"
        lines.append(f"{method:<30}{cells}{factor}{ident}")
    return "\n".join(lines)


def save_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(result, summary={m: summary(r) for m, r in result["runs"].items()})
    path.write_text(json.dumps(data, indent=1))


def plot(result: dict, path: str | Path, title: str = "organism: off-task drift vs task") -> None:
    """DRIFT (y, lower is better) against TASK (x, higher is better), mean ± sd per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for method, runs in result["runs"].items():
        row = summary(runs)
        ax.errorbar(row["task"][0], row["drift"][0], xerr=row["task"][1], yerr=row["drift"][1], fmt="o", capsize=3)
        ax.annotate(method, (row["task"][0], row["drift"][0]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("TASK: P(correct new content) on held-out task questions")
    ax.set_ylabel("DRIFT: P(evil) on other topics, minus base")
    seeds = len(result["seeds"])
    ax.set_title(f"{title} ({seeds} seed{'s' if seeds != 1 else ''})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
