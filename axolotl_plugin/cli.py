"""`axolotl grasp-identify CONFIG`: directions from a naive LoRA run that Axolotl trained with CONFIG.

The two-run workflow (instead of `grasp_identify_steps` in one run): train a naive LoRA with `axolotl train`,
run this command on the same YAML, then train again with `grasp: true` and the printed `grasp_directions`.
It reads the `grasp_*` keys (k, scope, energy, readers, module overrides) from the YAML and writes the
direction file and `spectrum.json` into the adapter directory, like stage 1 of a one-run job does.
Registered under Axolotl's `axolotl.cli_commands` entry point group (see pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml


def read_config(config: Path) -> dict:
    """The YAML mapping in `config`, with every problem Axolotl would hide or turn into a traceback raised as a
    one-line ValueError naming the file: broken YAML, not a mapping, `plugins:` not a list, an unknown
    `grasp*` key (with the closest known one)."""
    from .args import check_grasp_key_names

    try:
        raw = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{config}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{config}: expected a YAML mapping of Axolotl keys; found {type(raw).__name__}")
    plugins = raw.get("plugins")
    if plugins is not None and not isinstance(plugins, list):
        raise ValueError(
            f"{config}: plugins: expected a list such as [{PLUGIN}]; found {type(plugins).__name__} {plugins!r}"
        )
    try:
        check_grasp_key_names(raw)
    except ValueError as exc:
        raise ValueError(f"{config}: {exc}") from exc
    return raw


@click.command("grasp-identify")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--adapter",
    "adapter_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="LoRA adapter directory to identify from (default: the config's output_dir).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="replace an existing grasp_directions.safetensors / spectrum.json "
    "in the adapter directory (in a GRASP run's output_dir that file records what was projected)",
)
def grasp_identify(config: Path, adapter_dir: Path | None, overwrite: bool) -> None:
    """Extract GRASP directions from the LoRA adapter a naive `axolotl train CONFIG` run saved."""
    from grasp_trl.config import DIRECTIONS_FILENAME
    from grasp_trl.diagnostics import inspect_report
    from grasp_trl.directions import check_output
    from grasp_trl.identify import identify_from

    from .args import grasp_arguments

    try:
        raw = read_config(config)
        if adapter_dir is None and not raw.get("output_dir"):
            raise ValueError(f"{config}: no output_dir to read the adapter from; pass --adapter DIR")
        adapter_dir = adapter_dir or Path(raw["output_dir"])
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ValueError(f"{adapter_dir}: no adapter_config.json: not a saved LoRA adapter directory")
        for name in (DIRECTIONS_FILENAME, "spectrum.json"):
            check_output(adapter_dir / name, "", overwrite=overwrite)
        directions = identify_from(adapter_dir, grasp_arguments(raw))
    except (ValueError, OSError) as exc:  # DirectionFileError is a ValueError
        raise click.ClickException(str(exc)) from exc
    click.echo(inspect_report(directions))
    click.echo(
        f"\nwrote {directions.path} and {adapter_dir / 'spectrum.json'}\n"
        f"train with GRASP by adding to the YAML:\n\n"
        f"plugins:\n  - axolotl_plugin.GraspPlugin\ngrasp: true\ngrasp_directions: {directions.path}"
    )


PLUGIN = "axolotl_plugin.GraspPlugin"


def loaded_without_plugins_line() -> bool:
    """Whether the installed Axolotl loads GraspPlugin in every run: Axolotl >= 0.21 loads the plugins of the
    `axolotl.plugins` entry point group (grasp-trl registers GraspPlugin there); 0.19 only those a YAML lists."""
    try:
        from axolotl.integrations.base import get_builtin_plugins
    except ImportError:
        return False
    return PLUGIN in get_builtin_plugins()


def plugin_problem(raw: dict) -> str | None:
    """Why Axolotl would ignore the `grasp*` keys of a parsed YAML config (None when it would not)."""
    keys = sorted(key for key in raw if key == "grasp" or key.startswith("grasp_"))
    if keys and PLUGIN not in (raw.get("plugins") or []) and not loaded_without_plugins_line():
        return (
            f"{', '.join(keys)} set but `plugins:` does not list {PLUGIN}: Axolotl drops these keys without "
            f"a word and trains WITHOUT GRASP (Axolotl < 0.21 loads only listed plugins). Add:\nplugins:\n"
            f"  - {PLUGIN}"
        )
    return None


@click.command("grasp-check")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def grasp_check(config: Path) -> None:
    """Check a YAML before a long run: are the GRASP keys valid, and will Axolotl load the plugin at all?"""
    from pydantic import ValidationError

    from grasp_trl.directions import DirectionSet

    from .args import GraspArgs

    try:
        raw = read_config(config)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    problem = plugin_problem(raw)
    if problem:
        raise click.ClickException(f"{config}: {problem}")
    try:
        args = GraspArgs(**{key: value for key, value in raw.items() if key in GraspArgs.model_fields})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise click.ClickException(f"{config}: {f'{where}: ' if where else ''}{message}") from exc
    if args.grasp and args.grasp_directions:
        try:
            DirectionSet.load(args.grasp_directions)
        except ValueError as exc:
            raise click.ClickException(f"{config}: grasp_directions: {exc}") from exc
    if not args.grasp:
        click.echo(f"{config}: GRASP is off (no `grasp: true`)")
        return
    source = (
        f"direction file {args.grasp_directions}"
        if args.grasp_directions
        else "identify when the stopping rule fires (grasp_identify_steps: auto)"
        if args.grasp_identify_steps == "auto"
        else f"identify after {args.grasp_identify_steps} naive steps"
    )
    click.echo(
        f"{config}: GRASP on: {source}; {args.grasp_projection} projection, k={args.grasp_num_directions}, "
        f"{args.grasp_scope}"
    )


@click.command(
    "grasp-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def grasp_eval(args: tuple[str, ...]) -> None:
    """Emergent misalignment / political lean of a base model and its adapters (the flags of `grasp eval`;
    `axolotl grasp-eval --help` lists them)."""
    from grasp_trl.eval.cli import main

    try:
        main(list(args), prog="axolotl grasp-eval")
    except (ValueError, OSError, ImportError) as exc:  # ConnectionError is an OSError
        raise click.ClickException(str(exc)) from exc
