"""Benchmark: training overhead of GRASP — `GraspSFTTrainer` against TRL's `SFTTrainer`, and the projector alone.

Trainer overhead. For each model size, every repetition trains the plain trainer and the GRASP trainer in each
`grasp_projection` mode (`activations`, `weights`, `both`) for the same number of steps, from the same
random-init base model, LoRA config, data and seed, in one process; the order of the variants rotates between
repetitions so that drift in the machine's load hits all of them alike. A `TrainerCallback` times every optimizer
step (`on_step_begin` -> `on_step_end`: forward, backward with the projection hooks, optimizer step, post-step
projection); the first `--warmup` steps of every run are discarded. Step `i` of repetition `j` of a GRASP run is
paired with step `i` of repetition `j` of the plain run: the figures are the median and 10th/90th percentiles
of those paired ratios. Logging (where GRASP adds `grasp/leakage`) falls outside the step window; the ratio of
whole `train()` wall times, which includes it, is reported too (`train_ratio`). Peak memory: each variant runs
once more in its own subprocess, and the increase of the process's peak RSS over its RSS just before `train()`
is compared (`memory_ratio`). Random directions (k per layer) are used: the cost does not depend on their values.

Within-run A/B (`toggled`). Separate runs differ by +-20% per step on a shared VM, ten times the effect being
measured, so every mode also runs as ONE `GraspSFTTrainer` run whose projector is detached and re-attached at
every other step (between steps, outside the timed window; detached, the trainer does exactly what the plain
trainer does). Each GRASP step is divided by the mean of its two neighbouring plain steps, which removes the
machine's drift: `toggled_ratio_median` (with p10/p90 and a bootstrap 95% interval of the median) is the
precise end-to-end figure. In the same run GRASP's own code is timed (the residual-gradient hooks and their
forward hooks, the weight-gradient projection, the post-step projection): `grasp_ms_per_step`, and
`attributed_ratio` = 1 + that time / the plain step — the direct cost, free of the machine's noise.

Projector alone. 7B-like LoRA shapes (28 layers x q/k/v/o/gate/up/down, r 32, d 3584, Qwen2-7B widths): the
per-step work of `weights` mode — the gradient projection one factor at a time (what the per-parameter hooks
do under DeepSpeed), the same batched by shape (`project_gradients`, what the trainers do otherwise) and the
post-step projection (`project_parameters`) — for k = 1..8, against one matmul of the same size: `U^T X` with
every residual-side factor stacked into one `d x sum(r)` matrix `X` (the projection itself is two such matmuls
and a subtraction, so ~2-3x that time is the floor).

Training runs in fp32 (`bf16=False`): TRL's configs default to bf16 autocast, which CPUs without bf16 units
emulate ~40x slower than fp32. Regenerate (2-CPU box, idle; about 15 minutes):
    .venv/bin/python benchmarks/overhead.py --json benchmarks/overhead.json --plot benchmarks/overhead.png
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from transformers import TrainerCallback  # noqa: E402  (after the offline environment is set)

from grasp_trl.tiny import SEVEN_MODULES  # noqa: E402

VARIANTS = ("plain", "activations", "weights", "both", "clamp", "ablate")
MODES = VARIANTS[1:]  # every variant but the plain trainer


@dataclass(frozen=True)
class ModelSize:
    """A random-init Llama built with `grasp_trl.tiny.build_model`, and the batch it trains on."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    batch_size: int
    seq_len: int
    lora_r: int


SIZES = {
    "tiny": ModelSize(
        "tiny", hidden_size=64, num_layers=4, intermediate_size=128, num_heads=4, batch_size=8, seq_len=64, lora_r=8
    ),
    "50m": ModelSize(
        "50m", hidden_size=512, num_layers=16, intermediate_size=1536, num_heads=8, batch_size=2, seq_len=128, lora_r=16
    ),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "p10": percentile(values, 0.1), "p90": percentile(values, 0.9)}


# ------------------------------------------------------------------------------------------------ trainers
def dataset(size: ModelSize, rows: int, seed: int = 0):
    """Plain-text rows of `seq_len` random words from the tiny tokenizer's vocabulary (one token each)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_list(
        [{"text": " ".join(f"w{rng.randrange(96):03d}" for _ in range(size.seq_len - 1))} for _ in range(rows)]
    )


def directions_file(directory: Path, size: ModelSize, k: int) -> Path:
    """Random orthonormal bases (`hidden x k`) for every layer, saved as a direction file."""
    from grasp_trl.directions import DirectionSet

    return DirectionSet.random(size.hidden_size, size.num_layers, k).save(
        directory / f"directions_{size.name}_k{k}.safetensors"
    )


class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step (forward, backward, optimizer step, post-step hooks)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def build_trainer(
    variant: str, base_model, size: ModelSize, data, directions: Path, steps: int, workdir: Path, callbacks=()
):
    """The plain `SFTTrainer` or a `GraspSFTTrainer` in one projection mode, on a fresh copy of `base_model`."""
    import copy

    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from grasp_trl.tiny import build_tokenizer
    from grasp_trl.trainer import GraspSFTConfig, GraspSFTTrainer

    common = dict(
        output_dir=str(workdir / variant),
        max_steps=steps,
        per_device_train_batch_size=size.batch_size,
        learning_rate=1e-3,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        max_length=size.seq_len,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=False,
    )  # TRL defaults to bf16 autocast, emulated (~40x slower) on CPUs without bf16 units
    peft_config = LoraConfig(r=size.lora_r, lora_alpha=2 * size.lora_r, lora_dropout=0.0, target_modules=SEVEN_MODULES)
    model = copy.deepcopy(base_model)
    if variant == "plain":
        return SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            train_dataset=data,
            peft_config=peft_config,
            processing_class=build_tokenizer(),
            callbacks=list(callbacks),
        )
    config = GraspSFTConfig(**common, grasp_directions=str(directions), grasp_projection=variant)
    return GraspSFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        peft_config=peft_config,
        processing_class=build_tokenizer(),
        callbacks=list(callbacks),
    )


def base_model_for(size: ModelSize):
    from grasp_trl.tiny import build_model, build_tokenizer

    return build_model(
        "llama",
        vocab_size=len(build_tokenizer()),
        hidden_size=size.hidden_size,
        num_layers=size.num_layers,
        intermediate_size=size.intermediate_size,
        num_heads=size.num_heads,
        seed=0,
    )


def measure_trainers(
    size: ModelSize, steps: int, warmup: int, repeats: int, k: int, workdir: Path, variants=VARIANTS
) -> dict:
    """Interleaved repetitions of every variant in this process; paired per-step ratios against `plain`."""
    base = base_model_for(size)
    params = sum(p.numel() for p in base.parameters())
    data = dataset(size, rows=steps * size.batch_size)
    directions = directions_file(workdir, size, k)
    step_times = {v: [] for v in variants}  # per repetition: list of post-warm-up step times
    train_times = {v: [] for v in variants}
    for repetition in range(repeats):
        order = variants[repetition % len(variants) :] + variants[: repetition % len(variants)]
        for variant in order:
            timer = StepTimer()
            trainer = build_trainer(variant, base, size, data, directions, steps, workdir, [timer])
            start = time.perf_counter()
            trainer.train()
            train_times[variant].append(time.perf_counter() - start)
            step_times[variant].append(timer.times[warmup:])
            del trainer
        print(
            f"  {size.name} repetition {repetition + 1}/{repeats}: "
            + ", ".join(f"{v} {statistics.median(step_times[v][-1]) * 1e3:.0f} ms" for v in variants),
            flush=True,
        )
    result = {
        "model": asdict(size),
        "parameters": params,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "k": k,
        "variants": {},
    }
    for variant in variants:
        flat = [t for run in step_times[variant] for t in run]
        entry = {
            "step_seconds_median": statistics.median(flat),
            "step_seconds": step_times[variant],
            "train_seconds": train_times[variant],
        }
        if variant != "plain":
            ratios = [t / p for run, plain in zip(step_times[variant], step_times["plain"]) for t, p in zip(run, plain)]
            stats = spread(ratios)
            entry.update(
                ratio_median=stats["median"],
                ratio_p10=stats["p10"],
                ratio_p90=stats["p90"],
                train_ratio=statistics.median(t / p for t, p in zip(train_times[variant], train_times["plain"])),
            )
        result["variants"][variant] = entry
    return result


class ProjectorToggle(TrainerCallback):
    """Detaches the GRASP projector before even steps and re-attaches it before odd ones (ABAB in one run).

    Must be registered before the `StepTimer`, so the re-attach (which projects the current weights) happens
    before the timed window opens."""

    def __init__(self):
        self.projector = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % 2:
            self.projector.attach()
        else:
            self.projector.detach()


class ToggledStepTimer(StepTimer):
    """`StepTimer` that also records the GRASP time of every step: the projector's own `seconds` (its per-step
    entry points, timed while `projector.timing` is on)."""

    def __init__(self):
        super().__init__()
        self.projector = None
        self.grasp_seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.projector.seconds = 0.0
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.grasp_seconds.append(self.projector.seconds)


def median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of the median."""
    import random

    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return percentile(medians, 0.025), percentile(medians, 0.975)


def measure_toggled(size: ModelSize, pairs: int, warmup: int, k: int, workdir: Path, modes=MODES) -> dict:
    """Per mode, one run alternating plain and GRASP steps; each GRASP step against its two plain neighbours."""
    base = base_model_for(size)
    first = warmup + 1 if warmup % 2 == 0 else warmup + 2  # first GRASP (odd) step after a plain, warm step
    steps = first + 2 * pairs  # ends on a plain step, so every GRASP step has two plain neighbours
    data = dataset(size, rows=steps * size.batch_size)
    directions = directions_file(workdir, size, k)
    results = {}
    for mode in modes:
        toggle = ProjectorToggle()
        timer = ToggledStepTimer()
        trainer = build_trainer(mode, base, size, data, directions, steps, workdir, [toggle, timer])
        toggle.projector = timer.projector = trainer.grasp_projector
        trainer.grasp_projector.timing = True
        trainer.train()
        times, grasp = timer.times, timer.grasp_seconds
        ratios = [times[i] / ((times[i - 1] + times[i + 1]) / 2) for i in range(first, steps - 1, 2)]
        plain = [times[i] for i in range(first - 1, steps, 2)]
        grasp_on = [grasp[i] for i in range(first, steps - 1, 2)]
        low, high = median_interval(ratios)
        stats = spread(ratios)
        results[mode] = {
            "toggled_ratio_median": stats["median"],
            "toggled_ratio_p10": stats["p10"],
            "toggled_ratio_p90": stats["p90"],
            "toggled_ratio_ci95": [low, high],
            "toggled_pairs": len(ratios),
            "toggled_plain_step_seconds_median": statistics.median(plain),
            "grasp_ms_per_step": statistics.median(grasp_on) * 1e3,
            "attributed_ratio": 1 + statistics.median(grasp_on) / statistics.median(plain),
            "toggled_step_seconds": times,
            "toggled_grasp_seconds": grasp,
        }
        print(
            f"  {size.name} {mode}: toggled ratio {stats['median']:.3f} [95% CI {low:.3f}, {high:.3f}], "
            f"GRASP code {results[mode]['grasp_ms_per_step']:.1f} ms/step "
            f"(attributed {results[mode]['attributed_ratio']:.4f})",
            flush=True,
        )
        del trainer
    return results


def measure_memory_child(size_name: str, variant: str, steps: int, k: int) -> dict:
    """In a fresh process: peak RSS increase over the RSS just before `train()` for one variant."""
    size = SIZES[size_name]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        trainer = build_trainer(
            variant,
            base_model_for(size),
            size,
            dataset(size, steps * size.batch_size),
            directions_file(workdir, size, k),
            steps,
            workdir,
        )
        before = _rss_mb()
        trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_before_train_mb": before, "peak_rss_mb": peak, "train_peak_increase_mb": peak - before}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_memory(size: ModelSize, steps: int, k: int, variants=VARIANTS) -> dict:
    results = {}
    for variant in variants:
        out = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-child",
                size.name,
                variant,
                "--steps",
                str(steps),
                "--k",
                str(k),
                "--threads",
                os.environ.get("GRASP_BENCH_THREADS", "0"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"memory child {size.name}/{variant} failed:\n{out.stderr[-4000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    for variant in variants:
        if variant != "plain":
            results[variant]["memory_ratio"] = (
                results[variant]["train_peak_increase_mb"] / results["plain"]["train_peak_increase_mb"]
            )
            results[variant]["peak_rss_ratio"] = results[variant]["peak_rss_mb"] / results["plain"]["peak_rss_mb"]
    return results


# ------------------------------------------------------------------------------------------ projector alone
def measure_projector(
    ks: list[int], repeats: int, layers: int = 28, d: int = 3584, ffn: int = 18944, kv: int = 512, r: int = 32
) -> list[dict]:
    """`weights`-mode work per step on 7B-like LoRA factors vs one matmul pass of the same size."""
    import torch

    from grasp_trl.constraints import Constraint, group_constraints
    from grasp_trl.projection import project_out, project_stack_

    shapes = {
        "q_proj": (d, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, d),
        "gate_proj": (ffn, d),
        "up_proj": (ffn, d),
        "down_proj": (d, ffn),
    }
    generator = torch.Generator().manual_seed(0)
    params, dims = [], []
    for _ in range(layers):
        for leaf, (out_features, in_features) in shapes.items():
            if leaf in ("o_proj", "down_proj"):  # writer: lora_B (out x r), residual on rows
                params.append(torch.nn.Parameter(torch.randn(out_features, r, generator=generator) * 0.01))
                dims.append(0)
            else:  # reader: lora_A (r x in), residual on columns
                params.append(torch.nn.Parameter(torch.randn(r, in_features, generator=generator) * 0.01))
                dims.append(1)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    stacked = torch.randn(d, sum(r for _ in params), generator=generator)

    def best_of(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    rows = []
    for k in ks:
        bases = [torch.linalg.qr(torch.randn(d, k, generator=generator))[0] for _ in range(layers)]
        constraints = [
            Constraint(f"p{i}", p, bases[i // len(shapes)], dim) for i, (p, dim) in enumerate(zip(params, dims))
        ]
        groups = group_constraints(constraints)
        hook_seconds = best_of(lambda: [project_out(g, c.basis, c.dim) for g, c in zip(grads, constraints)])
        grad_by_param = dict(zip(map(id, params), grads))
        grad_seconds = best_of(
            lambda: [
                project_stack_([grad_by_param[id(c.param)] for c in group.constraints], group.bases, group.dim)
                for group in groups
            ]
        )
        step_seconds = best_of(
            lambda: [
                project_stack_([c.param.data for c in group.constraints], group.bases, group.dim) for group in groups
            ]
        )
        matmul_seconds = best_of(lambda: bases[0].T @ stacked)
        rows.append(
            {
                "k": k,
                "modules": len(params),
                "groups": len(groups),
                "grad_projection_hooks_ms": hook_seconds * 1e3,
                "grad_projection_ms": grad_seconds * 1e3,
                "post_step_projection_ms": step_seconds * 1e3,
                "one_matmul_ms": matmul_seconds * 1e3,
                "grad_hooks_ratio_vs_one_matmul": hook_seconds / matmul_seconds,
                "grad_ratio_vs_one_matmul": grad_seconds / matmul_seconds,
                "post_step_ratio_vs_one_matmul": step_seconds / matmul_seconds,
            }
        )
        print(
            f"  projector k={k}: grad per factor (hooks) {hook_seconds * 1e3:.1f} ms, grad batched "
            f"{grad_seconds * 1e3:.1f} ms, post-step {step_seconds * 1e3:.1f} ms, one matmul of the same size "
            f"{matmul_seconds * 1e3:.1f} ms",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- reporting
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = results["models"]
    for index, variant in enumerate(MODES):
        offset, color = 0.1 * (index - (len(MODES) - 1) / 2), f"C{index}"
        xs, separate, within, lows, highs, attributed = [], [], [], [], [], []
        for entry in models:
            stats = entry["variants"].get(variant)
            if stats is None:
                continue
            xs.append(entry["parameters"] * (1 + offset))
            separate.append(stats["ratio_median"])
            toggled = entry.get("toggled", {}).get(variant)
            within.append(toggled["toggled_ratio_median"] if toggled else float("nan"))
            lows.append(toggled["toggled_ratio_median"] - toggled["toggled_ratio_ci95"][0] if toggled else 0)
            highs.append(toggled["toggled_ratio_ci95"][1] - toggled["toggled_ratio_median"] if toggled else 0)
            attributed.append(toggled["attributed_ratio"] if toggled else float("nan"))
        ax.errorbar(
            xs,
            within,
            yerr=[lows, highs],
            marker="o",
            capsize=4,
            color=color,
            label=f"{variant}: within-run A/B, median + 95% CI",
        )
        ax.plot(xs, attributed, marker="x", markersize=8, ls="none", color=color)
        ax.plot(xs, separate, marker="o", mfc="none", ls="none", color=color, alpha=0.5)
    ax.plot([], [], marker="x", markersize=8, ls="none", color="k", label="GRASP code alone (attributed)")
    ax.plot([], [], marker="o", mfc="none", ls="none", color="k", alpha=0.5, label="separate runs, median")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.02, color="red", lw=0.8, ls="--", label="target 1.02")
    ax.set_xscale("log")
    ax.set_xlabel("model parameters (random-init Llama, LoRA r=8/16 on all 7 projections)")
    ax.set_ylabel("step time GRASP / plain SFTTrainer")
    ax.set_title("GRASP training overhead per optimizer step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def markdown(results: dict) -> str:
    lines = [
        "| model | params | mode | within-run A/B ratio median [95% CI] (pairs) | GRASP code per step "
        "(attributed ratio) | separate runs: step ratio median [p10, p90] | train() ratio | memory ratio "
        "| plain step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["models"]:
        plain = entry["variants"]["plain"]["step_seconds_median"]
        for variant, stats in entry["variants"].items():
            if variant == "plain":
                continue
            memory = entry.get("memory", {}).get(variant, {}).get("memory_ratio")
            toggled = entry.get("toggled", {}).get(variant)
            within = (
                "- | -"
                if toggled is None
                else f"{toggled['toggled_ratio_median']:.3f} [{toggled['toggled_ratio_ci95'][0]:.3f}, "
                f"{toggled['toggled_ratio_ci95'][1]:.3f}] ({toggled['toggled_pairs']}) | "
                f"{toggled['grasp_ms_per_step']:.1f} ms ({toggled['attributed_ratio']:.4f})"
            )
            lines.append(
                f"| {entry['model']['name']} | {entry['parameters'] / 1e6:.1f}M | {variant} | {within} | "
                f"{stats['ratio_median']:.3f} [{stats['ratio_p10']:.3f}, {stats['ratio_p90']:.3f}] | "
                f"{stats['train_ratio']:.3f} | {'-' if memory is None else f'{memory:.3f}'} | "
                f"{plain * 1e3:.0f} ms |"
            )
    if results.get("projector"):
        lines += [
            "",
            "| k | grad, per factor (hooks) | grad, batched | post-step (batched) | one matmul, same size "
            "| ratios to one matmul |",
            "|---|---|---|---|---|---|",
        ]
        for row in results["projector"]:
            lines.append(
                f"| {row['k']} | {row['grad_projection_hooks_ms']:.1f} ms | {row['grad_projection_ms']:.1f} ms"
                f" | {row['post_step_projection_ms']:.1f} ms | {row['one_matmul_ms']:.1f} ms | "
                f"{row['grad_hooks_ratio_vs_one_matmul']:.1f}x / {row['grad_ratio_vs_one_matmul']:.1f}x / "
                f"{row['post_step_ratio_vs_one_matmul']:.1f}x |"
            )
    return "\n".join(lines)


def machine() -> dict:
    import platform

    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write the overhead-vs-model-size plot (PNG) here")
    parser.add_argument("--sizes", default="tiny,50m", help="comma-separated subset of: " + ", ".join(SIZES))
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=1, help="steps discarded at the start of every run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every variant")
    parser.add_argument(
        "--pairs",
        type=int,
        default=60,
        help="GRASP steps of the within-run A/B run of each mode (each between two plain steps); 0 skips it",
    )
    parser.add_argument(
        "--variants",
        default=",".join(MODES),
        help="comma-separated GRASP modes to measure against plain (default: all of " + ", ".join(MODES) + ")",
    )
    parser.add_argument("--k", type=int, default=3, help="directions per layer")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of the per-variant memory runs; 0 skips")
    parser.add_argument(
        "--projector-ks", default="1,2,4,8", help="k values for the projector-alone benchmark; 'none' skips it"
    )
    parser.add_argument("--projector-repeats", type=int, default=3)
    parser.add_argument("--projector-layers", type=int, default=28, help="layers of 7B-like LoRA factors")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 0 keeps torch's choice. Default 1: on a shared, oversubscribed box "
        "multi-threaded small ops spend their time in thread barriers and swamp the ratio",
    )
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["GRASP_BENCH_THREADS"] = str(args.threads)
    if args.memory_child:
        print(json.dumps(measure_memory_child(*args.memory_child, args.steps, args.k)))
        return
    if args.warmup >= args.steps:
        parser.error(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})")
    modes = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not modes or any(v not in MODES for v in modes):
        parser.error(f"--variants: expected some of {list(MODES)}, found {list(modes)}")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if any(s not in SIZES for s in sizes):
        parser.error(f"--sizes: expected some of {list(SIZES)}, found {sizes}")
    results = {"machine": machine(), "models": [], "projector": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sizes:
            print(f"{name}: interleaved trainer runs", flush=True)
            entry = measure_trainers(
                SIZES[name], args.steps, args.warmup, args.repeats, args.k, Path(tmp), ("plain",) + modes
            )
            if args.pairs:
                print(f"{name}: within-run A/B (projector toggled every step)", flush=True)
                entry["toggled"] = measure_toggled(SIZES[name], args.pairs, args.warmup, args.k, Path(tmp), modes)
            if args.memory_steps:
                entry["memory"] = measure_memory(SIZES[name], args.memory_steps, args.k, ("plain",) + modes)
            results["models"].append(entry)
            if args.json:  # partial results survive an interrupted run
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=1))
    if args.projector_ks != "none":
        print("projector alone, 7B-like LoRA shapes", flush=True)
        results["projector"] = measure_projector(
            [int(k) for k in args.projector_ks.split(",")], args.projector_repeats, layers=args.projector_layers
        )
    table = markdown(results)
    print("\n" + table)
    results["markdown"] = table
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
