"""`grasp sft CONFIG.yaml` / `grasp dpo CONFIG.yaml`: TRL-style training launchers with the GRASP keys.

Same parser as TRL's own scripts (`TrlParser`): every field of the config dataclasses is also a `--flag`,
and flags override the YAML. Datasets come from `dataset_name` (hub name or a local dataset directory) or
TRL's `datasets:` mixture list (e.g. `{path: json, data_files: train.jsonl}` for local JSONL).
"""

from __future__ import annotations

from typing import Sequence


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
    if argv and not argv[0].startswith("-"):
        argv = ["--config", argv[0], *argv[1:]]
    parser = make_parser(kind)
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(argv)
    training_args.model_init_kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype,
                                       "trust_remote_code": training_args.trust_remote_code,
                                       "attn_implementation": model_args.attn_implementation}
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    else:
        raise ValueError("no training data: set dataset_name, or a `datasets:` list such as "
                         "[{path: json, data_files: train.jsonl}]")
    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path: expected a model id or a local model directory; found none")
    trainer = trainer_cls(
        model=model_args.model_name_or_path, args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args), peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"saved to {training_args.output_dir}")
