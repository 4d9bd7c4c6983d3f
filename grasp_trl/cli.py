"""The `grasp` console script: identify, inspect, probe, import, sft, dpo, demo, eval.

Every error path prints one line naming what is wrong and exits with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _first_line(exc: BaseException) -> str:
    """One line of an exception's message (some libraries raise multi-line messages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text.strip("\"'") if isinstance(exc, KeyError) else text


def _adapter_files(directory: str) -> list[Path]:
    """The files an identification reads under `directory` (its adapters, checkpoint-N ones included)."""
    return [*Path(directory).glob("adapter_*"), *Path(directory).glob("*/adapter_*")]


def _identify(args) -> None:
    from .diagnostics import inspect_report
    from .directions import DirectionSet, check_output
    from .identify import extract_directions

    check_output(args.output, "-o", reading=_adapter_files(args.adapter_dir), overwrite=args.overwrite)
    adapter_dir, stopping = args.adapter_dir, None
    if args.auto:
        from .stopping import choose_checkpoint

        adapter_dir, rule = choose_checkpoint(args.adapter_dir)
        stopping = {
            "rule": {"name": "gap", "every": rule.every, "drop": rule.drop, "min_cos": rule.min_cos},
            "checkpoint": str(adapter_dir),
            "reason": rule.stop_reason,
            "trace": rule.trace(),
        }
        print(f"stopping rule: {rule.stop_reason} -> identifying from {adapter_dir}")
    directions = extract_directions(
        adapter_dir,
        k=args.k,
        scope=args.scope,
        energy=args.energy,
        max_k=args.max_k,
        include_readers=args.include_readers,
        num_layers=args.num_layers,
    )
    if stopping is not None:
        directions = directions.with_metadata(stopping=stopping)
    path = directions.save(args.output)
    print(inspect_report(DirectionSet.load(path)))
    print(f"\nwrote {path}")


def _load_base(name: str):
    """The base causal LM and its tokenizer; any failure becomes one line naming the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train_cli import check_model_name

    check_model_name(name, "--model")
    try:
        model = AutoModelForCausalLM.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise ValueError(f"--model {name}: cannot load a causal LM and its tokenizer ({_first_line(exc)})") from exc
    return model, tokenizer


def _load_adapter(model, adapter_dir: str):
    """`model` with the PEFT adapter in `adapter_dir`; a wrong or foreign adapter is one clear line."""
    from peft import PeftModel

    from .lora import check_adapter_fits

    check_adapter_fits(model, adapter_dir)  # missing / not LoRA / foreign / NaN: one line each
    try:
        return PeftModel.from_pretrained(model, adapter_dir)
    except Exception as exc:
        name = getattr(model.config, "_name_or_path", "")
        raise ValueError(
            f"--adapter {adapter_dir}: cannot be applied to base model {name} ({_first_line(exc)})"
        ) from exc


def _inspect(args) -> None:
    from .diagnostics import inspect_report, logit_lens, logit_lens_report
    from .directions import DirectionSet, check_output

    if args.plot:
        check_output(args.plot, "--plot", reading=[args.file], overwrite=True)
    directions = DirectionSet.load(args.file)
    print(inspect_report(directions))
    readout = None
    if args.model:
        model, tokenizer = _load_base(args.model)
        readout = logit_lens(model, tokenizer, directions, top=args.top)
        print("\n" + logit_lens_report(readout))
    if args.plot:
        from .plots import plot_directions, save_png

        print(f"\nwrote {save_png(plot_directions(directions, readout), args.plot)}")


def _probe(args) -> None:
    from .directions import DirectionSet, check_output
    from .probe import DEFAULT_PROMPTS, drift_probe, load_prompts

    if args.plot:
        check_output(
            args.plot,
            "--plot",
            reading=[args.directions, *(_adapter_files(args.adapter)), *([args.prompts] if args.prompts else [])],
            overwrite=True,
        )
    directions = DirectionSet.load(args.directions)
    prompts = load_prompts(args.prompts or DEFAULT_PROMPTS)
    model, tokenizer = _load_base(args.model)
    directions.validate_for(model)
    model = _load_adapter(model, args.adapter)
    result = drift_probe(
        model, tokenizer, prompts, directions, batch_size=args.batch_size, n_bootstrap=args.bootstrap, seed=args.seed
    )
    print(result.table())
    if args.plot:
        from .plots import plot_probe, save_png

        print(f"\nwrote {save_png(plot_probe(result), args.plot)}")


def _import(args) -> None:
    from .diagnostics import inspect_report
    from .directions import DirectionSet, check_output
    from .importers import import_directions

    check_output(args.output, "-o", reading=[args.file], overwrite=args.overwrite)
    num_layers = args.num_layers
    if args.model and num_layers is None:
        from transformers import AutoConfig

        from .train_cli import check_model_name

        check_model_name(args.model, "--model")
        try:
            config = AutoConfig.from_pretrained(args.model)
        except Exception as exc:
            raise ValueError(f"--model {args.model}: cannot read its config ({_first_line(exc)})") from exc
        from .modules import config_value

        num_layers = config_value(
            config.get_text_config() if hasattr(config, "get_text_config") else config, "num_layers"
        )
    directions = import_directions(args.file, args.format, num_layers=num_layers, layers=args.layers)
    if args.model:
        directions = directions.with_metadata(base_model=args.model)
    path = directions.save(args.output)
    print(inspect_report(DirectionSet.load(path)))
    print(f"\nwrote {path}")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.output_dir)


def _train(kind):
    def run(args) -> None:
        from .train_cli import run_training

        run_training(kind, args.rest)

    return run


def _eval(args) -> None:
    from .eval.cli import config_from, run

    run(config_from(args))


def build_parser() -> argparse.ArgumentParser:
    from .config import GraspArguments

    parser = argparse.ArgumentParser(
        prog="grasp",
        description="GRASP: identify a spurious factor from a naive "
        "LoRA update, then fine-tune with it projected out of the learning signal.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = GraspArguments()
    identify = commands.add_parser(
        "identify",
        help="extract directions from a saved LoRA adapter directory (or, "
        "with --auto, from the checkpoint of a naive run the stopping rule picks)",
    )
    identify.add_argument(
        "adapter_dir", help="adapter directory; with --auto, the naive run's output_dir holding checkpoint-N adapters"
    )
    identify.add_argument(
        "-o",
        "--output",
        required=True,
        help="direction file to write (.safetensors; an existing file is refused unless --overwrite)",
    )
    identify.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    identify.add_argument(
        "--auto",
        action="store_true",
        help="replay grasp_identify_steps=auto's stopping rule "
        "over the run's checkpoints and identify from the one where it fires",
    )
    identify.add_argument(
        "-k",
        type=int,
        default=defaults.grasp_num_directions,
        help=f"directions per layer or in the global basis (default {defaults.grasp_num_directions}, "
        "as grasp_num_directions)",
    )
    identify.add_argument(
        "--scope",
        choices=["per_layer", "global"],
        default=defaults.grasp_scope,
        help=f"default {defaults.grasp_scope}, as grasp_scope",
    )
    identify.add_argument(
        "--energy", type=float, default=None, help="choose k per layer to capture this fraction of the squared spectrum"
    )
    identify.add_argument("--max-k", type=int, default=8, help="cap on k with --energy")
    identify.add_argument("--include-readers", action="store_true", help="also stack readers' input-side updates")
    identify.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="decoder blocks of the base model (read from its local config when omitted)",
    )
    identify.set_defaults(run=_identify)

    inspect = commands.add_parser("inspect", help="report on a direction file (text, optional plot, logit lens)")
    inspect.add_argument("file")
    inspect.add_argument("--plot", metavar="PNG", help="write spectrum / energy / cross-layer |cos| panels here")
    inspect.add_argument(
        "--model",
        metavar="BASE",
        help="base model: also read each direction out through its "
        "final norm + unembedding (tokens promoted / suppressed)",
    )
    inspect.add_argument("--top", type=int, default=8, help="tokens per side in the logit lens (default 8)")
    inspect.set_defaults(run=_inspect)

    probe = commands.add_parser(
        "probe",
        help="judge-free drift probe: shift of the residual stream along the "
        "directions, fine-tuned minus base, on neutral prompts, with a bootstrap CI",
    )
    probe.add_argument("--model", required=True, metavar="BASE", help="base model (directory or hub id)")
    probe.add_argument("--adapter", required=True, metavar="DIR", help="fine-tuned PEFT adapter directory")
    probe.add_argument("--directions", required=True, metavar="FILE", help="direction file (.safetensors)")
    probe.add_argument(
        "--prompts",
        default=None,
        metavar="FILE.jsonl",
        help="JSONL with a 'prompt' or 'text' per line (default: the shipped neutral prompts)",
    )
    probe.add_argument("--plot", metavar="PNG", help="also plot the shift per layer with its CI")
    probe.add_argument("--batch-size", type=int, default=16)
    probe.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    probe.add_argument("--seed", type=int, default=0)
    probe.set_defaults(run=_probe)

    imp = commands.add_parser("import", help="import persona/steering vectors into a direction file")
    imp.add_argument(
        "file",
        help="a layer tensor [L+1, d] (row 0 = embeddings, row l+1 = after block l; .pt or "
        ".safetensors) or a {layer: vector} safetensors file (layer = block index)",
    )
    imp.add_argument(
        "-o",
        "--output",
        required=True,
        help="direction file to write (.safetensors; an existing file is refused unless --overwrite)",
    )
    imp.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    imp.add_argument("--format", choices=["auto", "layer-tensor", "layer-dict"], default="auto")
    imp.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="decoder blocks of the target model (checked for a layer tensor; needed for a "
        "{layer: vector} file unless --model is given, else inferred from the largest key)",
    )
    imp.add_argument("--model", metavar="BASE", help="target base model (its config gives num_layers)")
    imp.add_argument("--layers", type=int, nargs="+", default=None, help="keep only these block indices")
    imp.set_defaults(run=_import)

    demo = commands.add_parser("demo", help="GRASP on the model organism: base vs naive vs GRASP, table + plot")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.set_defaults(run=_demo)

    from .eval.cli import DESCRIPTION, add_arguments

    evaluate = commands.add_parser(
        "eval",
        description=DESCRIPTION,
        help="emergent misalignment / political lean of base and adapters with a named judge (docs/EVAL.md)",
    )
    add_arguments(evaluate).set_defaults(run=_eval)

    for kind in ("sft", "dpo"):
        train = commands.add_parser(
            kind, help=f"TRL {kind.upper()} with GRASP: grasp {kind} CONFIG.yaml [--flags]", add_help=False
        )
        train.add_argument("rest", nargs=argparse.REMAINDER)
        train.set_defaults(run=_train(kind))
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command in ("sft", "dpo"):  # everything after the command is TRL's, `--help` included
        args.rest = argv[argv.index(args.command) + 1 :]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.run(args)
    except Exception as exc:
        if args.debug:
            raise
        expected = isinstance(exc, (ValueError, OSError, KeyError, ImportError))
        kind = "" if expected else f"{type(exc).__name__}: "
        hint = "" if expected else " (run with --debug for the traceback)"
        print(f"grasp {args.command}: error: {kind}{_first_line(exc)}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
