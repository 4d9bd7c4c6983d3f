"""Benchmark: identification cost (`extract_directions`) on 7B- and 70B-shaped LoRA adapters.

What it measures and why:
* Synthetic adapters with the LoRA shapes of a 7B (Qwen2-7B: 28 layers, d 3584, ffn 18944, 512-wide k/v, r 32)
  and a 70B model (Llama-70B: 80 layers, d 8192, ffn 28672, 1024-wide k/v, r 64) are written as real PEFT
  adapter directories (`adapter_config.json` + `adapter_model.safetensors` with PEFT's key names, all seven
  projections, random fp32 factors), so extraction exercises the real on-disk path: reading only the tensors
  it needs, hashing the file for the metadata, the low-rank SVD per layer or globally.
* Each case runs `extract_directions(adapter_dir, ...)` in a fresh subprocess, so the peak RSS is that case's
  alone (reported as the process peak and as the increase over the process after `import torch, grasp_trl`).
* The baseline is a dense SVD of `dW = s B A`: one module of the 7B-shaped adapter (`k_proj`, 512 x 3584, by
  default) is materialised and SVD'd (measured, one thread like the extraction), and the time for every
  selected module of each adapter is EXTRAPOLATED from it with the `min(m,n)^2 max(m,n)` cost of a dense SVD.
  A dense SVD of a whole 70B adapter would take days on this machine; the figures are labelled extrapolated.

Regenerate (2-CPU box; adapters are cached in --workdir, ~0.9 GB for 7B and ~3.3 GB for 70B):
    .venv/bin/python benchmarks/identify.py --json benchmarks/identify.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Module leaf -> (parent, role); the order is the order PEFT would list them.
MODULES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
WRITERS = ("o_proj", "down_proj")


@dataclass(frozen=True)
class AdapterShape:
    """LoRA shapes of a decoder: `layers` blocks, hidden `d`, MLP width `ffn`, k/v width `kv`, LoRA rank `r`."""

    name: str
    layers: int
    d: int
    ffn: int
    kv: int
    r: int

    def module_shape(self, leaf: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection."""
        return {
            "q_proj": (self.d, self.d),
            "k_proj": (self.kv, self.d),
            "v_proj": (self.kv, self.d),
            "o_proj": (self.d, self.d),
            "gate_proj": (self.ffn, self.d),
            "up_proj": (self.ffn, self.d),
            "down_proj": (self.d, self.ffn),
        }[leaf]

    def parameters(self) -> int:
        return self.layers * sum(self.r * sum(self.module_shape(m)) for m in MODULES)


SHAPES = {
    "7b": AdapterShape("7b", layers=28, d=3584, ffn=18944, kv=512, r=32),
    "70b": AdapterShape("70b", layers=80, d=8192, ffn=28672, kv=1024, r=64),
    "tiny": AdapterShape("tiny", layers=3, d=64, ffn=160, kv=32, r=4),  # for the smoke test
}


def module_key(layer: int, leaf: str) -> str:
    return f"base_model.model.model.layers.{layer}.{MODULES[leaf]}.{leaf}"


def write_adapter(directory: Path, shape: AdapterShape, seed: int = 0) -> Path:
    """Write a PEFT LoRA adapter of `shape` with random fp32 factors (skipped if an identical one exists)."""
    import torch
    from safetensors.torch import save_file

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": shape.r,
        "lora_alpha": 2 * shape.r,
        "lora_dropout": 0.0,
        "target_modules": sorted(MODULES),
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "base_model_name_or_path": f"synthetic/{shape.name}-shaped",
        "revision": None,
        "inference_mode": True,
        "grasp_benchmark_shape": asdict(shape),
        "seed": seed,
    }
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if config_path.is_file() and weights_path.is_file() and json.loads(config_path.read_text()) == config:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.layers):
        for leaf in MODULES:
            out_features, in_features = shape.module_shape(leaf)
            key = module_key(layer, leaf)
            tensors[f"{key}.lora_A.weight"] = torch.randn(shape.r, in_features, generator=generator) / in_features**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, shape.r, generator=generator) * 0.01
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=1))
    return directory


# ----------------------------------------------------------------------------------------- child processes
def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_extraction(adapter_dir: str, scope: str, k: int, include_readers: bool, layers: int) -> dict:
    """In this (fresh) process: time one `extract_directions` call; peak RSS of the process."""
    import torch  # noqa: F401  (imported before the baseline RSS is taken)

    from grasp_trl.identify import extract_directions

    baseline = _rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    directions = extract_directions(adapter_dir, k=k, scope=scope, include_readers=include_readers, num_layers=layers)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert len(directions.bases) == layers and directions.hidden_size > 0
    peak = _peak_rss_mb()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "peak_rss_increase_mb": peak - baseline,
    }


def measure_dense(adapter_dir: str, layer: int, leaf: str, k: int) -> dict:
    """In this process: materialise `dW = s B A` of one module in fp32 and take its dense SVD (top k kept)."""
    import torch
    from safetensors import safe_open

    torch.set_num_threads(1)  # as extract_directions does
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    key = module_key(layer, leaf)
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as handle:
        lora_a, lora_b = handle.get_tensor(f"{key}.lora_A.weight"), handle.get_tensor(f"{key}.lora_B.weight")
    baseline = _rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    delta = (config["lora_alpha"] / config["r"]) * (lora_b @ lora_a)
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)
    u = u[:, :k]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _peak_rss_mb()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "shape": list(delta.shape),
        "peak_rss_mb": peak,
        "peak_rss_increase_mb": peak - baseline,
    }


def run_child(*args: str) -> dict:
    """Run this file with `args` in a fresh interpreter; return the JSON it prints on its last line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- dense model
def dense_cost(m: int, n: int) -> float:
    """Leading-order cost of a dense SVD (and forming `dW`, `m n r` is negligible next to it): min^2 max."""
    return min(m, n) ** 2 * max(m, n)


def dense_extrapolated_seconds(
    shape: AdapterShape, measured_shape: tuple[int, int], measured_seconds: float, include_readers: bool
) -> float:
    """Dense-SVD time for every selected module of `shape`, scaled from one measured module."""
    leaves = MODULES if include_readers else WRITERS
    cost = shape.layers * sum(dense_cost(*shape.module_shape(leaf)) for leaf in leaves)
    return measured_seconds * cost / dense_cost(*measured_shape)


# ------------------------------------------------------------------------------------------------- driver
CASES = {  # name -> (scope, include_readers)
    "per_layer": ("per_layer", False),
    "per_layer+readers": ("per_layer", True),
    "global": ("global", False),
}


def run(
    shapes: list[str], cases: list[str], workdir: Path, k: int, dense_shape: str | None, dense_module: str, repeats: int
) -> dict:
    results = {"machine": machine(), "k": k, "cases": [], "dense": None}
    dense = None
    if dense_shape is not None:
        adapter = write_adapter(workdir / dense_shape, SHAPES[dense_shape])
        dense = run_child("--dense", str(adapter), "--dense-module", dense_module, "--k", str(k))
        dense.update(adapter_shape=dense_shape, module=dense_module)
        results["dense"] = dense
        print(f"dense SVD of one {dense_shape} {dense_module} dW {dense['shape']}: {dense['seconds']:.2f} s (measured)")
    for name in shapes:
        shape = SHAPES[name]
        start = time.perf_counter()
        adapter = write_adapter(workdir / name, shape)
        size_mb = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
        print(
            f"{name}: adapter {size_mb:.0f} MB ({shape.parameters() / 1e6:.0f}M LoRA params), "
            f"ready in {time.perf_counter() - start:.1f} s"
        )
        for scope, readers in (CASES[c] for c in cases):
            runs = [
                run_child(
                    "--measure",
                    str(adapter),
                    "--scope",
                    scope,
                    "--k",
                    str(k),
                    "--layers",
                    str(shape.layers),
                    *(["--include-readers"] if readers else []),
                )
                for _ in range(repeats)
            ]
            best = min(runs, key=lambda r: r["seconds"])
            case = {
                "shape": name,
                **asdict(shape),
                "adapter_mb": size_mb,
                "scope": scope,
                "include_readers": readers,
                "k": k,
                "seconds": best["seconds"],
                "seconds_all": [r["seconds"] for r in runs],
                "cpu_seconds": best["cpu_seconds"],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "peak_rss_increase_mb": max(r["peak_rss_increase_mb"] for r in runs),
            }
            if dense is not None:
                extrapolated = dense_extrapolated_seconds(shape, tuple(dense["shape"]), dense["seconds"], readers)
                case["dense_seconds_extrapolated"] = extrapolated
                case["speedup_vs_dense_extrapolated"] = extrapolated / case["seconds"]
            results["cases"].append(case)
            print(
                f"  {scope:<9} readers={readers!s:<5} {case['seconds']:7.2f} s (cpu {case['cpu_seconds']:.2f} s)"
                f"  peak RSS "
                f"{case['peak_rss_mb']:6.0f} MB (+{case['peak_rss_increase_mb']:.0f})"
                + (
                    f"  dense ~{case['dense_seconds_extrapolated']:.0f} s (extrapolated), "
                    f"{case['speedup_vs_dense_extrapolated']:.0f}x"
                    if dense
                    else ""
                )
            )
    return results


def machine() -> dict:
    import platform

    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--shapes", default="7b,70b", help="comma-separated subset of: " + ", ".join(SHAPES))
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/grasp_bench_adapters"),
        help="where the synthetic adapters are written (kept for reruns)",
    )
    parser.add_argument("--cases", default="per_layer,global", help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--k", type=int, default=3, help="directions per layer")
    parser.add_argument(
        "--dense-shape",
        default="7b",
        help="adapter shape one of whose dW is SVD'd densely for the baseline; 'none' skips it",
    )
    parser.add_argument(
        "--dense-module",
        default="k_proj",
        choices=list(MODULES),
        help="which module of layer 0 the dense baseline measures",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (the fastest is reported)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--dense", help=argparse.SUPPRESS)
    parser.add_argument("--scope", default="per_layer", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--include-readers", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_extraction(args.measure, args.scope, args.k, args.include_readers, args.layers)))
        return
    if args.dense:
        print(json.dumps(measure_dense(args.dense, 0, args.dense_module, args.k)))
        return
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for option, given, known in (("--shapes", shapes, SHAPES), ("--cases", cases, CASES)):
        if any(item not in known for item in given):
            parser.error(f"{option}: unknown {[i for i in given if i not in known]}; expected some of {list(known)}")
    dense_shape = None if args.dense_shape == "none" else args.dense_shape
    results = run(shapes, cases, args.workdir, args.k, dense_shape, args.dense_module, args.repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
