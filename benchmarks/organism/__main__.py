"""`python -m benchmarks.organism --world WORLD.yaml --bases 2 --seeds 3 --json OUT.json --plot OUT.png [--methods ...]`

Runs every selected method on every (base, seed) of one organism design (each base's pretrained model cached
on disk), prints the validity line first, then per-method reduction factors per seed with their median and
worst seed, writes the JSON and a DRIFT-vs-TASK plot. See README.md for the world, the metrics and the tables.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONTROLS = ["naive", "caft-supervised", "random-activations"]
MODES = ("activations", "weights", "both", "clamp", "ablate")
GRASP_MODES = [f"grasp-{mode}-global-k{k}-auto" for mode in MODES for k in (1, 2)]
ORACLES = [f"oracle-{mode}" for mode in MODES]
BASELINES = ["caft-identified", "caft-identified-auto", "posthoc", "kl-base"]
PRESETS = {
    "controls": CONTROLS,
    "core": CONTROLS
    + ["grasp-default", "grasp-both-global-k1", "grasp-clamp-global-k1-auto", "oracle-both"]
    + BASELINES,
    "full": ["base"]
    + CONTROLS
    + ["grasp-default"]
    + GRASP_MODES
    + ["grasp-both-global-k2", "grasp-both-per_layer-k2-auto"]
    + ORACLES
    + BASELINES
    + ["steer-prevent", "steer-inference", "undertrained-naive"],
    "timing": CONTROLS
    + [f"grasp-both-global-k2-at{s}" for s in (10, 20, 30, 40, 50, 75, 100)]
    + ["grasp-both-global-k2", "grasp-both-global-k2-auto"],
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.organism", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", default=None, help="world YAML (default: grasp_organism/default_world.yaml)")
    parser.add_argument(
        "--bases",
        type=int,
        default=2,
        help="draws 0..B-1 of the organism (world, model and pretraining seeds offset by the draw)",
    )
    parser.add_argument(
        "--draws",
        type=int,
        nargs="+",
        default=None,
        help="run these draws instead of 0..B-1 (e.g. --draws 2 3 8: the valid shipped ones)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds 0..N-1 (same for every method)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["core"],
        help=f"method names and/or presets {sorted(PRESETS)}; the controls {CONTROLS} are always run (validity)",
    )
    parser.add_argument("--json", default=None, help="write per-seed results, summaries and validity here")
    parser.add_argument("--plot", default=None, help="write the DRIFT-vs-TASK plot (PNG) here")
    parser.add_argument(
        "--cache-dir", default=None, help="pretrained-model cache (default ~/.cache/grasp-trl/organism)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is fastest for this tiny model on a shared CPU; results do not depend on it)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="bases run in this many worker processes (one torch thread each; results do not depend on it)",
    )
    args = parser.parse_args(argv)

    import torch

    from grasp_organism.methods import known_methods, valid_method
    from grasp_organism.report import plot, run_grid, save_json, table
    from grasp_organism.world import OrganismConfig, default_config_path

    from . import baselines  # noqa: F401  (registers the baselines)

    torch.set_num_threads(args.threads)
    methods = list(dict.fromkeys(CONTROLS + [m for name in args.methods for m in PRESETS.get(name, [name])]))
    bad = [m for m in methods if not valid_method(m)]
    if bad:
        parser.error(f"unknown method(s) {bad}; known: {known_methods()}; presets: {sorted(PRESETS)}")
    draws = args.draws if args.draws is not None else list(range(args.bases))
    if any(d < 0 for d in draws) or len(set(draws)) != len(draws):
        parser.error(f"--draws: expected distinct non-negative draw numbers; found {args.draws}")
    config = OrganismConfig.from_yaml(args.world or default_config_path())
    log = lambda message: print(message, flush=True)  # noqa: E731
    result = run_grid(
        config,
        methods,
        draws,
        list(range(args.seeds)),
        cache_dir=args.cache_dir,
        log=log,
        jobs=args.jobs,
        registries=("benchmarks.organism.baselines",),
    )
    if args.json:
        save_json(result, args.json)
    print()
    for base, metrics in result["base_metrics"].items():
        print(f"base {base}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    print(table(result))
    print(f"\n{len(methods)} methods x {len(draws)} bases x {args.seeds} seeds in {result['seconds']:.0f}s")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
