"""Helpers for the tests that launch `grasp_worker.py`: the shared set-up, the launch, and reading results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from grasp_trl.directions import DirectionSet
from testing_utils import saved_lora_leakage

WORKER = Path(__file__).with_name("grasp_worker.py")
FSDP2_WORKER = Path(__file__).with_name("fsdp2_worker.py")
REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "deepspeed"
ZERO2, ZERO3 = str(RECIPES / "zero2.json"), str(RECIPES / "zero3.json")
PARTITION_ALL = {"stage3_param_persistence_threshold": 0}  # ZeRO-3: partition the tiny adapter as a real model's is
# The bounds every distributed test checks its invariants with: fp32 (projection exact up to fp32 rounding), and
# bf16 rounding of a tensor projected in fp32 and cast back (measured 3e-4 to 8e-4).
INVARIANT_TOL = 1e-6
BF16_TOL = 2e-3


def environment() -> dict:
    """Offline, quiet, and DeepSpeed's JIT-built CPU ops cached per virtual environment (DESIGN §6: an op
    built by another DeepSpeed version breaks start-up; the first build takes minutes on 2 cores)."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        DO_NOT_TRACK="1",
        AXOLOTL_DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        PYTHONPATH=str(REPO),
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return env


def free_port() -> int:
    """A free TCP port for the rendezvous (other test sessions may be using torchrun's default)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_worker(
    worker: Path, spec: dict, workdir: Path, distributed: bool, timeout: int = 900, env: dict | None = None
) -> None:
    """Run `worker` on `spec` (2 torchrun ranks, or one plain process); raise with the log's tail on failure."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "runs.json"
    spec_file.write_text(json.dumps(spec, indent=1))
    if distributed:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(worker),
            str(spec_file),
        ]
    else:
        command = [sys.executable, str(worker), str(spec_file)]
    log = workdir / "worker.log"
    with log.open("w") as handle:
        completed = subprocess.run(
            command,
            env={**environment(), **(env or {})},
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if completed.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({completed.returncode}); last lines of {log}:\n"
            + "\n".join(log.read_text().splitlines()[-40:])
        )


def worker_spec(base_dir: Path, directions: Path, out_dir: Path, table: dict, steps: int, per_device: int) -> dict:
    """grasp_worker.py's input: every run of `table` (name -> settings, or (settings, ...) tuples whose first
    item is the settings) on one base model and direction file, `steps` steps, `per_device` unless a run says."""
    runs = [
        {
            "name": name,
            "out_dir": str(out_dir),
            "steps": steps,
            "per_device": per_device,
            **(entry[0] if isinstance(entry, tuple) else entry),
        }
        for name, entry in table.items()
    ]
    return {"base_dir": str(base_dir), "directions": str(directions), "runs": runs}


def launch(
    spec: dict, workdir: Path, distributed: bool, timeout: int = 900, engine: str | None = None
) -> dict[str, dict]:
    """Run grasp_worker.py on `spec` (2 torchrun ranks under DeepSpeed, or FSDP2 with `engine="fsdp2"`, or one
    plain process); return each run's result.json."""
    run_worker(WORKER, spec, workdir, distributed, timeout, {"GRASP_WORKER_ENGINE": engine} if engine else None)
    return {
        run["name"]: json.loads((Path(run["out_dir"]) / run["name"] / "result.json").read_text())
        for run in spec["runs"]
    }


def trained_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The saved adapter (or full model) of one run, in fp32."""
    directory = Path(directory)
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        path = directory / "model.safetensors"
    return {key: value.float() for key, value in load_file(path).items()}


def relative_distance(
    found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None
) -> float:
    """Largest per-tensor `||found - expected|| / ||expected - base||`: the distance between two trained
    results relative to what training changed (`base` omitted: relative to `expected`, right for LoRA, whose
    B starts at zero)."""
    assert found.keys() == expected.keys(), (sorted(found)[:5], sorted(expected)[:5])
    worst = 0.0
    for key, value in expected.items():
        norm = float((value - base[key]).norm()) if base is not None else float(value.norm())
        if norm > 0:
            worst = max(worst, float((found[key] - value).norm()) / norm)
    return worst


def saved_leakage(adapter_dir: Path, directions: DirectionSet) -> float:
    """Largest relative component along the directions of any writer/reader update in a saved adapter (the
    tests' own oracle, `testing_utils.saved_lora_leakage`)."""
    by_module = saved_lora_leakage(adapter_dir, directions)
    assert len(by_module) == 7 * len(directions.bases), sorted(by_module)
    return max(by_module.values())


def zero_checkpoint_adapter(run_dir: Path, step: int, target: Path) -> Path:
    """The fp32 master weights of a run's DeepSpeed checkpoint (what resuming and `zero_to_fp32` use),
    consolidated with DeepSpeed's own tool and written as a PEFT adapter directory next to the run's config."""
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    checkpoint = Path(run_dir) / f"checkpoint-{step}"
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    adapter = {
        key.replace(".default.weight", ".weight"): value.float().contiguous()
        for key, value in state.items()
        if ".lora_" in key
    }
    assert adapter, f"{checkpoint}: no LoRA tensors among {sorted(state)[:5]}"
    target.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(target / "adapter_model.safetensors"))
    shutil.copyfile(Path(run_dir) / "adapter_config.json", target / "adapter_config.json")
    return target
