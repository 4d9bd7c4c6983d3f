"""What the organism diagnostics (`speeds.py`, `decompose.py`) share: the design arguments, one `Lab` per base
(pretrained models cached), and the JSON they write."""

from __future__ import annotations

import json
from pathlib import Path


def add_design_arguments(parser, *, bases: int, seeds: int) -> None:
    """`--world`, `--bases`, `--seeds`, `--cache-dir`: which organism design, draws and fine-tuning seeds."""
    parser.add_argument("--world", default=None, help="world YAML (default: grasp_organism/default_world.yaml)")
    parser.add_argument("--bases", type=int, default=bases, help="draws 0..B-1 of the organism (as the benchmark)")
    parser.add_argument("--seeds", type=int, default=seeds, help="fine-tuning seeds 0..N-1")
    parser.add_argument(
        "--cache-dir", default=None, help="pretrained-model cache (default ~/.cache/grasp-trl/organism)"
    )


def world_path(args) -> str:
    from grasp_organism.world import default_config_path

    return args.world or str(default_config_path())


def labs(args):
    """`(base, Lab)` for every draw `args.bases` names, on one torch thread (results do not depend on it)."""
    import torch

    from grasp_organism.lab import Lab
    from grasp_organism.report import base_config
    from grasp_organism.world import OrganismConfig

    torch.set_num_threads(1)
    config = OrganismConfig.from_yaml(world_path(args))
    for base in range(args.bases):
        yield base, Lab(base_config(config, base), cache_dir=args.cache_dir, log=lambda *a, **k: None)


def write_json(path: str | Path, payload: dict) -> None:
    """`payload` as indented JSON, written atomically (no NaN: a metric that is not a number is a bug)."""
    from grasp_trl.directions import atomic_write

    text = json.dumps(payload, indent=1, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
