"""`python -m benchmarks.organism --world WORLD.yaml --seeds 3 --json OUT.json --plot OUT.png [--methods ...]`

Runs every selected method on every seed of one organism (pretrained base cached on disk), prints mean ± sd
of all metrics per method, writes the per-seed JSON and a DRIFT-vs-TASK plot. See README.md for the world,
the metrics and the latest table.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GRASP_GRID = [f"grasp-{mode}-global-k3" for mode in ("activations", "weights", "both")] + \
    ["grasp-activations-per_layer-k3"] + [f"grasp-activations-global-k{k}" for k in (1, 2, 4, 5)]
CONTROLS = ["oracle-activations", "oracle-weights", "random-activations", "caft-supervised", "undertrained-naive"]
BASELINES = ["caft-identified", "steer-prevent", "kl-base", "posthoc", "steer-inference"]
PRESETS = {
    "full": ["base", "naive"] + GRASP_GRID + CONTROLS + BASELINES,
    "core": ["base", "naive", "grasp-activations-global-k3", "grasp-weights-global-k3"] + CONTROLS + BASELINES,
    "k-sweep": ["base", "naive"] + [f"grasp-activations-{s}-k{k}" for s in ("global", "per_layer") for k in range(1, 6)],
    "modes": ["base", "naive"] + [f"grasp-{m}-{s}-k3" for m in ("activations", "weights", "both")
                                  for s in ("global", "per_layer")],
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.organism", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default=None, help="world YAML (default: grasp_trl/organism/default_world.yaml)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (same seeds for every method)")
    parser.add_argument("--methods", nargs="+", default=["core"],
                        help=f"method names and/or presets {sorted(PRESETS)}; "
                             "GRASP variants: grasp-{activations|weights|both}-{global|per_layer}-k{1..9}")
    parser.add_argument("--k", type=int, default=3, help="k of the identified directions used by caft-identified, "
                                                         "posthoc and random-activations")
    parser.add_argument("--scope", default="global", choices=["global", "per_layer"])
    parser.add_argument("--json", default=None, help="write per-seed results + summary here")
    parser.add_argument("--plot", default=None, help="write the DRIFT-vs-TASK plot (PNG) here")
    parser.add_argument("--cache-dir", default=None, help="pretrained-model cache (default ~/.cache/grasp-trl/organism)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model "
                                                               "on a shared CPU)")
    args = parser.parse_args(argv)

    import torch

    from grasp_trl.organism.methods import Lab, valid_method
    from grasp_trl.organism.report import plot, run_grid, save_json, table
    from grasp_trl.organism.world import OrganismConfig, default_config_path

    torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys(m for name in args.methods for m in PRESETS.get(name, [name])))
    bad = [m for m in methods if not valid_method(m)]
    if bad:
        parser.error(f"unknown method(s) {bad}")
    config = OrganismConfig.from_yaml(args.world or default_config_path())
    lab = Lab(config, cache_dir=args.cache_dir, k=args.k, scope=args.scope, log=lambda s: print(s, flush=True))
    result = run_grid(lab, methods, list(range(args.seeds)), log=lambda s: print(s, flush=True))
    if args.json:
        save_json(result, args.json)
    print("\nbase: " + "  ".join(f"{k} {v:.3f}" for k, v in lab.base_metrics.items()))
    print(table(result))
    print(f"\n{len(methods)} methods x {args.seeds} seeds in {result['seconds']:.0f}s")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
