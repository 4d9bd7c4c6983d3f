"""Running (method x base x seed) grids on the organism and reporting them: validity first, then per-seed
reduction factors with their median and worst seed, the JSON, and a DRIFT-vs-TASK plot.

A *base* is one draw of the organism: `world.seed`, `model.seed` and `pretrain.seed` all offset by the base
index from the world file's values, so a figure over bases holds for re-drawn worlds and pretrained models,
not for one lucky draw. A *seed* is a fine-tuning seed (LoRA init and data order), shared by every method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

from . import methods as registry
from .lab import Lab
from .validity import check, defined, factors, format_factor
from .world import OrganismConfig

COLUMNS = ("drift", "task", "retention", "conditional", "narrow")


def base_config(config: OrganismConfig, base: int) -> OrganismConfig:
    """Draw `base` of the organism: every seed of the world, model and pretraining sections offset by `base`."""
    return dataclasses.replace(
        config,
        world=dataclasses.replace(config.world, seed=config.world.seed + base),
        model=dataclasses.replace(config.model, seed=config.model.seed + base),
        pretrain=dataclasses.replace(config.pretrain, seed=config.pretrain.seed + base),
    )


def run_base(
    config: OrganismConfig,
    methods: list[str],
    base: int,
    seeds: list[int],
    *,
    cache_dir=None,
    log=print,
    labs: dict | None = None,
) -> tuple[dict, dict[str, list[dict]]]:
    """Every method on every seed of one base, seed-major (each seed's naive run is trained once).
    Returns the base's metrics and the runs; `labs`, when given, receives the base's `Lab` for reuse."""
    lab = Lab(base_config(config, base), cache_dir=cache_dir, log=log)
    if labs is not None:
        labs[base] = lab
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    started, total = time.time(), len(methods) * len(seeds)
    for seed in seeds:
        for method in methods:
            run = registry.run(lab, method, seed)
            runs[method].append(
                {"base": base, "seed": seed, "seconds": round(run.seconds, 2), **run.metrics, **run.extra}
            )
            if log:
                m = run.metrics
                log(
                    f"[base {base}: {sum(map(len, runs.values()))}/{total}] seed {seed} {method:<32} drift "
                    f"{m['drift']:+.3f} task {m['task']:.3f} ret {m['retention']:.3f} cond {m['conditional']:.3f} "
                    f"({run.seconds:.0f}s, {time.time() - started:.0f}s)"
                )
    return lab.base_metrics, runs


def _run_base_in_worker(args) -> tuple[dict, dict]:
    """`run_base` in a worker process: one torch thread, and the method registries the parent had."""
    import importlib

    import torch

    config, methods, base, seeds, cache_dir, modules = args
    torch.set_num_threads(1)
    for module in modules:
        importlib.import_module(module)
    return run_base(config, methods, base, seeds, cache_dir=cache_dir, log=lambda m: print(m, flush=True))


def run_grid(
    config: OrganismConfig,
    methods: list[str],
    bases: list[int],
    seeds: list[int],
    *,
    cache_dir=None,
    log=print,
    labs: dict | None = None,
    jobs: int = 1,
    registries: tuple[str, ...] = (),
) -> dict:
    """Every method on every (base, seed). With `jobs > 1` the bases run in that many worker processes (each
    base is deterministic on its own, so the numbers do not depend on `jobs`); `registries` are modules the
    workers import to register extra methods. `labs` (in-process only) receives each base's `Lab`."""
    started = time.time()
    if jobs > 1 and len(bases) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(bases)), mp_context=context) as pool:
            outputs = list(
                pool.map(_run_base_in_worker, [(config, methods, b, seeds, cache_dir, registries) for b in bases])
            )
    else:
        outputs = [run_base(config, methods, b, seeds, cache_dir=cache_dir, log=log, labs=labs) for b in bases]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _, base_runs in outputs:
        for method, rows in base_runs.items():
            runs[method].extend(rows)
    return {
        "bases": bases,
        "seeds": seeds,
        "base_metrics": {str(b): out[0] for b, out in zip(bases, outputs)},
        "runs": runs,
        "config": config.to_dict(),
        "seconds": round(time.time() - started, 1),
    }


def validity(result: dict) -> dict:
    """Validity over all bases together and per base (a base whose controls fail is named)."""
    runs = result["runs"]
    overall = check(runs)
    per_base = {}
    for base in result["bases"]:
        only = {m: [r for r in rs if r["base"] == base] for m, rs in runs.items()}
        per_base[base] = check(only)
    return {"overall": overall, "per_base": per_base}


def summary(result: dict, method: str) -> dict:
    """Per-seed reduction factors (median, worst), and mean/sd of each metric; task and retention also as a
    fraction of naive's on the same base and seed."""
    runs = result["runs"][method]
    out: dict = {}
    for metric in COLUMNS:
        values = [r[metric] for r in runs if r[metric] == r[metric]]
        out[metric] = (
            (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
            if values
            else (math.nan, math.nan)
        )
    if "naive" in result["runs"] and method not in ("naive", "base"):
        naive = {(r["base"], r["seed"]): r for r in result["runs"]["naive"]}
        per_seed = factors(result["runs"], method)
        out["factors"] = per_seed
        out["median"] = statistics.median(defined(per_seed)) if defined(per_seed) else math.nan
        out["worst"] = min(defined(per_seed)) if defined(per_seed) else math.nan
        for metric in ("task", "retention"):
            out[f"{metric}_vs_naive"] = statistics.mean(r[metric] / naive[(r["base"], r["seed"])][metric] for r in runs)
    idents = [statistics.mean(r["identification"].values()) for r in runs if "identification" in r]
    if idents:
        out["ident"] = statistics.mean(idents)
    stage1 = [r["stage1_steps"] for r in runs if "stage1_steps" in r]
    if stage1:
        out["stage1_steps"] = (min(stage1), max(stage1))
    return out


def restricted(result: dict, bases: list[int]) -> dict:
    """The same result with only the runs of `bases`."""
    return dict(
        result, bases=bases, runs={m: [r for r in rs if r["base"] in bases] for m, rs in result["runs"].items()}
    )


def table(result: dict) -> str:
    """Validity lines, then one row per method: per-seed factors, median, worst and the side effects. When some
    bases pass their controls and others do not, one table over the valid bases and one, labelled, over the
    invalid ones: an invalid base cannot rank methods, and a figure over valid bases says how many there were."""
    checked = validity(result)
    lines = [checked["overall"].line(f"{len(result['bases'])} base(s) x {len(result['seeds'])} seed(s)")]
    if len(result["bases"]) > 1:
        lines += [f"  {checked['per_base'][b].line(f'base {b}')}" for b in result["bases"]]
    valid = [b for b in result["bases"] if checked["per_base"][b].valid]
    if len(result["bases"]) > 1 and 0 < len(valid) < len(result["bases"]):
        invalid = [b for b in result["bases"] if b not in valid]
        return "\n".join(
            lines
            + [
                f"\n{len(valid)} of {len(result['bases'])} bases valid.",
                f"\nVALID BASES {valid}:",
                _rows(restricted(result, valid)),
                f"\nINVALID BASES {invalid} (controls failed; no ranking is meaningful here):",
                _rows(restricted(result, invalid)),
            ]
        )
    if not checked["overall"].valid:
        lines.append("INVALID WORLD: the positive controls failed; no ranking below is meaningful.")
    return "\n".join(lines + [_rows(result)])


def _rows(result: dict) -> str:
    lines = []
    header = (
        f"{'method':<34}{'median':>9}{'worst':>9}{'drift':>15}{'task':>8}{'/naive':>8}{'retention':>11}"
        f"{'/naive':>8}{'cond':>7}{'ident':>7}{'stage1':>9}  per-seed factors (base:seed order)"
    )
    lines += [header, "-" * len(header)]
    for method in result["runs"]:
        row = summary(result, method)
        median = format_factor(row["median"]) if "median" in row else "-"
        worst = format_factor(row["worst"]) if "worst" in row else "-"
        task_rel = f"{row['task_vs_naive']:.3f}" if "task_vs_naive" in row else "-"
        ret_rel = f"{row['retention_vs_naive']:.3f}" if "retention_vs_naive" in row else "-"
        ident = f"{row['ident']:.2f}" if "ident" in row else "-"
        stage1 = "-" if "stage1_steps" not in row else "{}-{}".format(*row["stage1_steps"])
        seeds = " ".join(("rem" if f == math.inf else "n/a" if f != f else f"{f:.1f}") for f in row.get("factors", []))
        lines.append(
            f"{method:<34}{median:>9}{worst:>9}{row['drift'][0]:>+9.3f}±{row['drift'][1]:<5.3f}"
            f"{row['task'][0]:>8.3f}{task_rel:>8}{row['retention'][0]:>11.3f}{ret_rel:>8}"
            f"{row['conditional'][0]:>7.3f}{ident:>7}{stage1:>9}  {seeds}"
        )
    return "\n".join(lines)


def save_json(result: dict, path: str | Path) -> None:
    """The per-seed runs, the summaries and the validity verdicts, written atomically."""
    from grasp_trl.directions import atomic_write

    checked = validity(result)
    data = dict(
        result,
        summary={m: summary(result, m) for m in result["runs"]},
        validity={
            "valid": checked["overall"].valid,
            "checks": checked["overall"].checks,
            "per_base": {str(b): {"valid": v.valid, "checks": v.checks} for b, v in checked["per_base"].items()},
        },
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(data), indent=1, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _jsonable(value):
    """Strict JSON: a factor of inf (drift removed) becomes "removed", NaN (undefined) null, tuples lists."""
    if isinstance(value, float):
        return "removed" if value == math.inf else None if value != value or value == -math.inf else value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def plot(result: dict, path: str | Path, title: str = "organism: off-task drift vs task") -> None:
    """DRIFT (y, lower is better) against TASK (x, higher is better): one dot per (base, seed), the mean as
    a large marker, so a method that fails on one seed shows it. Only the valid bases when some are not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_base = validity(result)["per_base"]
    valid = [b for b in result["bases"] if per_base[b].valid]
    shown = restricted(result, valid) if 0 < len(valid) < len(result["bases"]) else result
    verdict = (
        f"{len(valid)} of {len(result['bases'])} bases valid, valid shown"
        if shown is not result
        else "valid"
        if validity(result)["overall"].valid
        else "INVALID world"
    )
    result = shown
    fig, ax = plt.subplots(figsize=(8, 6))
    for index, (method, runs) in enumerate(result["runs"].items()):
        color = plt.cm.tab20(index % 20)
        ax.scatter([r["task"] for r in runs], [r["drift"] for r in runs], s=12, alpha=0.5, color=color)
        task, drift = statistics.mean(r["task"] for r in runs), statistics.mean(r["drift"] for r in runs)
        ax.scatter([task], [drift], s=70, color=color, edgecolor="black", label=method)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("TASK: P(correct new content) on held-out task questions")
    ax.set_ylabel("DRIFT: P(evil) on other topics, minus base")
    ax.set_title(f"{title}\n{len(result['bases'])} base(s) x {len(result['seeds'])} seed(s), {verdict}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
