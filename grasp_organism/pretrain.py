"""Pretraining of the organism's tiny Llama on its world: shipped for the default world, else cached on disk.

Pretraining is deterministic on one machine but chaotic across machines: the same code and seeds on another
CPU's kernels (measured by emulating one, `ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2`) gives a
base whose fine-tunes drift +0.156 instead of +0.128 (float64 pretraining diverges too); a fine-tune *from the
same base file* agrees to ~2e-7 under either kernel set (benchmarks/organism/README.md, the note "machine
robustness" at its top). So the bases
every published figure uses ship with the package (`SHIPPED`, safetensors: draws 0-11 of the default world and
0-7 of `benchmarks/organism/worlds/closer_speeds.yaml`, made by `python -m benchmarks.organism.ship_bases`), and a
base is looked up there first, then in the cache, and pretrained (and cached) only when neither has it: other
worlds' and draws' figures hold for the machine that ran them.

The key is a hash of the world, model and pretraining sections (and the step count), so a changed knob never
reuses a stale model. Entries are written to a temporary directory and renamed into place, so an interrupted
run leaves no half-written model behind.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .world import OrganismConfig, World

DEFAULT_CACHE = Path(os.environ.get("GRASP_ORGANISM_CACHE", Path.home() / ".cache" / "grasp-trl" / "organism"))
SHIPPED = Path(__file__).parent / "bases"  # read-only: the published draws (default and closer-speeds worlds)


def build_base(config: OrganismConfig, world: World):
    """A freshly initialised tiny Llama sized for the world's vocabulary (deterministic for `model.seed`)."""
    from grasp_trl.tiny import build_model

    spec = config.model
    return build_model(
        "llama",
        vocab_size=world.vocab_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        intermediate_size=spec.intermediate_size,
        num_heads=spec.num_heads,
        seed=spec.seed,
        bos_token_id=1,
        eos_token_id=2,
    )


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(config: OrganismConfig, world: World, steps: int, log=print):
    """Train from scratch for `steps` steps; returns the model (eval mode) and the final smoothed loss."""
    spec = config.pretrain
    torch.manual_seed(spec.seed)
    model = build_base(config, world)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    rng = random.Random(spec.seed)
    smoothed, started = None, time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, min(spec.warmup, max(1, steps // 10)), spec.lr)
        batch = world.pretrain_batch(rng, spec.batch_size)
        # right padding + causal attention: real tokens never attend to pads, so no mask is needed (faster)
        loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"  pretrain step {step + 1}/{steps}  loss {smoothed:.4f}  ({time.time() - started:.0f}s)")
    model.eval()
    return model, smoothed


def entry_name(config: OrganismConfig, steps: int) -> str:
    """The directory name of a pretrained base, shipped or cached: its pretraining key and step count."""
    return f"{config.pretrain_key(steps)}-s{steps}"


def pretrained_model(
    config: OrganismConfig, world: World, *, steps: int | None = None, cache_dir: str | Path | None = None, log=print
):
    """The pretrained base for `config` (or its `steps`-step variant): shipped, cached, or trained and cached."""
    from transformers import AutoModelForCausalLM

    steps = config.pretrain.steps if steps is None else steps
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    name = entry_name(config, steps)
    entry = cache_dir / name
    for found in (SHIPPED / name, entry):
        if (found / "organism.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(found)
            model.eval()
            return model
    if log:
        log(f"pretraining the organism ({steps} steps; cached at {entry})")
    started = time.time()
    model, loss = pretrain(config, world, steps, log=log)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=cache_dir))
    try:
        model.save_pretrained(tmp)
        (tmp / "organism.json").write_text(
            json.dumps(
                {
                    "config": config.to_dict(),
                    "steps": steps,
                    "final_loss": loss,
                    "seconds": round(time.time() - started, 1),
                    # provenance: another CPU or torch pretrains a different base (module docstring)
                    "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                },
                indent=2,
            )
        )
        if entry.exists():  # a concurrent run finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model
