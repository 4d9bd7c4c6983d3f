"""Helpers for the Axolotl tests: local JSONL data, a CPU config, an `axolotl train` subprocess, and the
weight-space invariant checked from the files a run left on disk."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from grasp_trl.config import DIRECTIONS_FILENAME
from grasp_trl.directions import DirectionSet
from testing_utils import SEVEN_MODULES, residual_role, saved_lora_leakage

AXOLOTL = str(Path(sys.executable).with_name("axolotl"))


def write_data(directory: Path, rows: int = 32, seed: int = 0) -> dict[str, Path]:
    """`sft.jsonl` ({"text"}) and `dpo.jsonl` ({"prompt", "chosen", "rejected"}) in the tiny vocabulary."""
    rng = random.Random(seed)
    words = lambda n: " ".join(f"w{rng.randrange(96):03d}" for _ in range(n))  # noqa: E731
    directory.mkdir(parents=True, exist_ok=True)
    sft, dpo = directory / "sft.jsonl", directory / "dpo.jsonl"
    sft.write_text("".join(json.dumps({"text": words(20)}) + "\n" for _ in range(rows)))
    dpo.write_text(
        "".join(
            json.dumps({"prompt": words(8), "chosen": " " + words(6), "rejected": " " + words(6)}) + "\n"
            for _ in range(rows)
        )
    )
    return {"sft": sft, "dpo": dpo}


def cpu_config(model_dir: Path, data: dict[str, Path], output_dir: Path, *, kind: str = "sft", **overrides) -> dict:
    """A few-step fp32 LoRA config for CPU with the GRASP plugin loaded (kind: sft or dpo)."""
    cfg = {
        "base_model": str(model_dir),
        "tokenizer_type": "AutoTokenizer",
        "output_dir": str(output_dir),
        "dataset_prepared_path": str(output_dir.parent / f"{output_dir.name}-prepared"),
        "val_set_size": 0,
        "sequence_len": 64,
        "sample_packing": False,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": SEVEN_MODULES,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 4,
        "learning_rate": 0.01,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "plugins": ["axolotl_plugin.GraspPlugin"],
        "grasp": True,
        "grasp_projection": "both",
    }
    if kind == "sft":
        cfg["datasets"] = [{"path": str(data["sft"]), "ds_type": "json", "type": "completion"}]
    elif kind == "dpo":
        cfg.update(rl="dpo", datasets=[{"path": str(data["dpo"]), "ds_type": "json", "type": "passthrough"}])
    else:
        raise ValueError(f"kind: expected sft or dpo, found {kind!r}")
    cfg.update(overrides)
    return cfg


def run_axolotl(
    cfg: dict | Path, workdir: Path, *args: str, timeout: float = 900
) -> tuple[subprocess.CompletedProcess, float]:
    """`axolotl train` in `workdir` on a YAML file (or on `cfg` written to `workdir/cfg.yml`); returns the
    process and its wall time."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = cfg
    if isinstance(cfg, dict):
        path = workdir / "cfg.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        # the default launcher re-executes through `accelerate`, which lives next to this interpreter
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [AXOLOTL, "train", str(path), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.perf_counter() - start


def saved_leakage(adapter_dir: Path, directions_file: Path | None = None) -> dict[str, float]:
    """Per LoRA module of the saved adapter, its relative leakage along the saved direction file's basis (the
    tests' own oracle, `testing_utils.saved_lora_leakage`)."""
    directions = DirectionSet.load(directions_file or adapter_dir / DIRECTIONS_FILENAME)
    return saved_lora_leakage(adapter_dir, directions)


def assert_invariant(adapter_dir: Path, tol: float = 1e-6) -> dict[str, float]:
    ratios = saved_leakage(adapter_dir)
    roles = {residual_role(m) for m in ratios}
    assert roles == {"write", "read"}, f"expected constrained writers and readers in {adapter_dir}, found {roles}"
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= tol, f"{worst}: leakage {ratios[worst]:.3e} > {tol:g}"
    return ratios


def lora_moved(adapter_dir: Path) -> float:
    """Largest |B| entry: B starts at zero, so a positive value means the adapter was trained."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return max(float(t.abs().max()) for k, t in tensors.items() if ".lora_B." in k)


__all__ = ["write_data", "cpu_config", "run_axolotl", "saved_leakage", "assert_invariant", "lora_moved"]
