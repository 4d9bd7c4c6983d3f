"""The `grasp` console script: identify, inspect, sft, dpo, demo.

Every error path prints one line naming what is wrong and exits with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def _identify(args) -> None:
    from .diagnostics import inspect_report
    from .directions import DirectionSet
    from .identify import extract_directions

    directions = extract_directions(args.adapter_dir, k=args.k, scope=args.scope, energy=args.energy,
                                    max_k=args.max_k, include_readers=args.include_readers,
                                    num_layers=args.num_layers)
    path = directions.save(args.output)
    print(inspect_report(DirectionSet.load(path)))
    print(f"\nwrote {path}")


def _inspect(args) -> None:
    from .diagnostics import inspect_report
    from .directions import DirectionSet

    print(inspect_report(DirectionSet.load(args.file)))


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.output_dir)


def _train(kind):
    def run(args) -> None:
        from .train_cli import run_training

        run_training(kind, args.rest)
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grasp", description="GRASP: identify a spurious factor from a naive "
                                     "LoRA update, then fine-tune with it projected out of the learning signal.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    identify = commands.add_parser("identify", help="extract directions from a saved LoRA adapter directory")
    identify.add_argument("adapter_dir")
    identify.add_argument("-o", "--output", required=True, help="direction file to write (.safetensors)")
    identify.add_argument("-k", type=int, default=1, help="directions per layer (default 1)")
    identify.add_argument("--scope", choices=["per_layer", "global"], default="per_layer")
    identify.add_argument("--energy", type=float, default=None,
                          help="choose k per layer to capture this fraction of the squared spectrum")
    identify.add_argument("--max-k", type=int, default=8, help="cap on k with --energy")
    identify.add_argument("--include-readers", action="store_true", help="also stack readers' input-side updates")
    identify.add_argument("--num-layers", type=int, default=None,
                          help="decoder blocks of the base model (read from its local config when omitted)")
    identify.set_defaults(run=_identify)

    inspect = commands.add_parser("inspect", help="report on a direction file")
    inspect.add_argument("file")
    inspect.set_defaults(run=_inspect)

    demo = commands.add_parser("demo", help="tiny end-to-end run: naive LoRA, identify, re-train with projection")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.set_defaults(run=_demo)

    for kind in ("sft", "dpo"):
        train = commands.add_parser(kind, help=f"TRL {kind.upper()} with GRASP: grasp {kind} CONFIG.yaml [--flags]",
                                    add_help=False)
        train.add_argument("rest", nargs=argparse.REMAINDER)
        train.set_defaults(run=_train(kind))
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, OSError, KeyError) as exc:
        if args.debug:
            raise
        print(f"grasp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
