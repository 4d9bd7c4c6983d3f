"""Names that differ across the transformers releases grasp-trl supports.

transformers 5.24 renamed `gradient_checkpointing` / `gradient_checkpointing_kwargs` (TrainingArguments) and
`gradient_checkpointing_enable` (models) to `activation_checkpointing*`; the old names still work there but
warn, and go in v6. Older releases know only the old names. These helpers speak whichever names the installed
release has, so configs and code written with either name work on both without a warning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from transformers import TrainingArguments

NEW, OLD = "activation_checkpointing", "gradient_checkpointing"
CHECKPOINTING = NEW if NEW in {field.name for field in dataclasses.fields(TrainingArguments)} else OLD


def _renamed(name: str) -> str:
    """`name` (a config key or a `--flag`) with its checkpointing prefix spelled as this transformers does."""
    for prefix in ("--", ""):
        for other in (NEW, OLD):
            if other != CHECKPOINTING and name.startswith(prefix + other):
                return prefix + CHECKPOINTING + name[len(prefix + other) :]
    return name


def checkpointing_names(config: Mapping) -> dict:
    """A config mapping with `gradient_checkpointing*` / `activation_checkpointing*` keys under this release's names."""
    return {_renamed(key): value for key, value in config.items()}


def checkpointing_flags(argv: list[str]) -> list[str]:
    """Command-line arguments with the checkpointing `--flags` under this release's names (values untouched)."""
    return [_renamed(arg) if arg.startswith("--") else arg for arg in argv]


def checkpointing_args(enabled: bool, **kwargs) -> dict:
    """TrainingArguments keywords that turn checkpointing on or off, `kwargs` going to its `*_kwargs`."""
    return {CHECKPOINTING: enabled, **({f"{CHECKPOINTING}_kwargs": kwargs} if kwargs else {})}


def enable_checkpointing(model, **kwargs) -> None:
    """`model.activation_checkpointing_enable` where it exists, else `gradient_checkpointing_enable`; `kwargs`
    go to `torch.utils.checkpoint` (e.g. `use_reentrant`)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
