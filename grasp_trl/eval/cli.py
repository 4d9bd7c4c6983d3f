"""`grasp eval` / `axolotl grasp-eval`: the argument parser, built from `EvalConfig` (one flag per field, the
field's help text), and the entry point that runs the pipeline and prints where the results went."""

from __future__ import annotations

import argparse
import dataclasses

from .config import EvalConfig


def build_parser(prog: str = "grasp eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Emergent misalignment and political lean of a base "
                                     "model and its adapters: questions -> answers -> a named judge -> EM rates "
                                     "with Wilson intervals, differences from base with paired-bootstrap "
                                     "intervals. See docs/EVAL.md.")
    for f in dataclasses.fields(EvalConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=meta["help"])
        elif meta.get("repeat"):
            parser.add_argument(flag, action="append", help=meta["help"])
        else:
            kind = {"int": int, "int | None": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=f.default, choices=meta.get("choices"), help=meta["help"])
    return parser


def config_from(argv: list[str] | None, prog: str = "grasp eval") -> EvalConfig:
    return EvalConfig(**vars(build_parser(prog).parse_args(argv)))


def main(argv: list[str] | None = None, prog: str = "grasp eval") -> dict | None:
    """Parse, run, print the comparison table; errors propagate as one-line exceptions for the caller."""
    from pathlib import Path

    from .report import comparison_markdown
    from .run import run_eval

    config = config_from(argv, prog)
    summary = run_eval(config)
    if summary is not None:
        print(comparison_markdown(summary))
        out = Path(config.out)
        print(f"wrote {out / 'answers.jsonl'}, {out / 'summary.json'}, {out / 'comparison.md'}, {out / 'em.png'}, "
              f"{out / 'aligned_coherent.png'}")
    return summary

