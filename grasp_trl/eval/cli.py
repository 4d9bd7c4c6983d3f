"""`grasp eval` / `axolotl grasp-eval`: the argument parser, built from `EvalConfig` (one flag per field, the
field's help text), and the entry points that run the pipeline and print where the results went."""

from __future__ import annotations

import argparse
import dataclasses

from .config import EvalConfig

DESCRIPTION = (
    "Emergent misalignment and political lean of a base model and its adapters: questions -> answers "
    "-> a named judge -> EM rates with Wilson intervals, differences from base with paired-bootstrap "
    "intervals. See docs/EVAL.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per `EvalConfig` field (`--max-tokens` for `max_tokens`), with the field's help."""
    for f in dataclasses.fields(EvalConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=meta["help"])
        elif meta.get("repeat"):
            parser.add_argument(flag, action="append", metavar=meta.get("metavar"), help=meta["help"])
        else:
            kind = {"int": int, "int | None": int, "float": float}.get(f.type, str)
            parser.add_argument(
                flag,
                type=kind,
                default=f.default,
                choices=meta.get("choices"),
                metavar=meta.get("metavar"),
                help=meta["help"],
            )
    return parser


def config_from(namespace: argparse.Namespace) -> EvalConfig:
    """The `EvalConfig` in a parsed namespace (other keys, e.g. the `grasp` command's own, are ignored)."""
    return EvalConfig(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(EvalConfig)})


def run(config: EvalConfig) -> dict | None:
    """Run the evaluation and print the comparison table and the files written."""
    from pathlib import Path

    from .report import comparison_markdown
    from .run import run_eval

    summary = run_eval(config)
    if summary is not None:
        print(comparison_markdown(summary))
        out = Path(config.out)
        print(
            f"wrote {out / 'answers.jsonl'}, {out / 'summary.json'}, {out / 'comparison.md'}, {out / 'em.png'}, "
            f"{out / 'aligned_coherent.png'}"
        )
    return summary


def main(argv: list[str] | None = None, prog: str = "grasp eval") -> dict | None:
    """Stand-alone entry (Axolotl's `grasp-eval`): parse `argv` and run; errors propagate as one-line exceptions."""
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))
    return run(config_from(parser.parse_args(argv)))
