"""`grasp sft CONFIG.yaml` / `grasp dpo CONFIG.yaml`: TRL-style training launchers with the GRASP keys.

Same parser as TRL's own scripts (`TrlParser`): every field of the config dataclasses is also a `--flag`,
and flags override the YAML. Datasets come from `dataset_name` (hub name or a local dataset directory) or
TRL's `datasets:` mixture list (e.g. `{path: json, data_files: train.jsonl}` for local JSONL).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# The columns each trainer needs (TRL's formats); data of the other kind fails inside TRL with a bare KeyError.
PREFERENCE_COLUMNS = ("chosen", "rejected")


def check_model_name(name: str, flag: str) -> None:
    """A `name` written as a local path (it has a separator or starts with '.') must exist: otherwise
    transformers reports it as a malformed hub id ("Repo id must be in the form ...")."""
    if (os.sep in name or name.startswith(".")) and not Path(name).exists():
        raise FileNotFoundError(f"{flag} {name}: model directory not found")


def make_parser(kind: str):
    """The `TrlParser` of `grasp KIND` (script, training, model and dataset arguments), which also takes
    `gradient_checkpointing*` and `activation_checkpointing*` alike (transformers 5.24 renamed them; the
    installed release's names are used)."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from .compat import checkpointing_names
    from .trainer import GraspDPOConfig, GraspSFTConfig

    class Parser(TrlParser):
        def set_defaults_with_config(self, **config):
            return super().set_defaults_with_config(**checkpointing_names(config))

    config_cls = {"sft": GraspSFTConfig, "dpo": GraspDPOConfig}[kind]
    return Parser((ScriptArguments, config_cls, ModelConfig, DatasetMixtureConfig), prog=f"grasp {kind}")


def run_training(kind: str, argv: Sequence[str]) -> None:
    from datasets import load_dataset
    from trl import get_dataset, get_peft_config, get_quantization_config

    from .compat import checkpointing_flags
    from .trainer import GraspDPOTrainer, GraspSFTTrainer

    trainer_cls = {"sft": GraspSFTTrainer, "dpo": GraspDPOTrainer}[kind]
    argv = checkpointing_flags(list(argv))
    if not argv:  # TRL's defaults would then fail on an unrelated setting (bf16 on a CPU)
        raise ValueError(
            f"expected a CONFIG.yaml (grasp {kind} CONFIG.yaml [--flags]); found no "
            f"arguments (grasp {kind} --help lists the flags)"
        )
    if argv and not argv[0].startswith("-"):
        if not Path(argv[0]).is_file():
            raise FileNotFoundError(f"{argv[0]}: config file not found (grasp {kind} CONFIG.yaml [--flags])")
        argv = ["--config", argv[0], *argv[1:]]
    parser = make_parser(kind)
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(argv)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
    }
    if model_args.model_name_or_path is not None:
        check_model_name(model_args.model_name_or_path, "model_name_or_path")
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    else:
        raise ValueError(
            "no training data: set dataset_name, or a `datasets:` list such as [{path: json, data_files: train.jsonl}]"
        )
    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path: expected a model id or a local model directory; found none")
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"dataset_train_split: expected one of the data's splits {sorted(dataset)}; found "
            f"{script_args.dataset_train_split!r}"
        )
    columns = dataset[script_args.dataset_train_split].column_names
    if kind == "dpo" and not set(PREFERENCE_COLUMNS) <= set(columns):
        raise ValueError(
            f"{script_args.dataset_name or 'datasets'}: grasp dpo expects preference pairs (columns "
            f"'chosen' and 'rejected', optionally 'prompt'); found columns {columns}"
        )
    trainer = trainer_cls(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"saved to {training_args.output_dir}")
