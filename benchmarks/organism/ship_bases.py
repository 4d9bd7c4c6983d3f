"""`python -m benchmarks.organism.ship_bases --bases 12 [--world W.yaml]`: pretrain draws 0..B-1 of a world
(default: the default world) into `grasp_organism/bases/` (the shipped bases every published organism figure
uses; `grasp_organism.pretrain`).

A draw already there is kept, never overwritten: re-shipping a base changes every figure measured on it, so
delete its directory on purpose first (and regenerate the tables). Pretraining is deterministic on one machine
and chaotic across machines, which is why the bases ship instead of being re-made by each user.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.organism.ship_bases", description=__doc__)
    parser.add_argument("--bases", type=int, default=12, help="draws 0..B-1 of the world")
    parser.add_argument("--world", default=None, help="world YAML (default: grasp_organism/default_world.yaml)")
    args = parser.parse_args(argv)

    import torch

    from grasp_organism.pretrain import SHIPPED, entry_name, pretrained_model
    from grasp_organism.report import base_config
    from grasp_organism.world import OrganismConfig, World, default_config_path

    torch.set_num_threads(1)
    config = OrganismConfig.from_yaml(args.world or default_config_path())
    for base in range(args.bases):
        drawn = base_config(config, base)
        pretrained_model(drawn, World(drawn.world), cache_dir=SHIPPED, log=print)
        print(f"draw {base}: {SHIPPED / entry_name(drawn, drawn.pretrain.steps)}")


if __name__ == "__main__":
    main()
