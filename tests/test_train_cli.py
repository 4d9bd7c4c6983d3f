"""`grasp sft` / `grasp dpo`: the recipes parse, and a YAML run (with flag overrides) trains with GRASP."""

import json
from pathlib import Path

import pytest

from grasp_trl.config import DIRECTIONS_FILENAME, STAGE1_DIRNAME
from grasp_trl.directions import DirectionSet
from testing_utils import saved_lora_leakage
from trainer_fixtures import dpo_dataset, make_base, sft_dataset

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "trl"


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_recipe_parses_with_every_key_known(kind):
    from grasp_trl.compat import CHECKPOINTING
    from grasp_trl.train_cli import make_parser

    recipe = RECIPES / f"{kind}.yaml"
    assert recipe.read_text().startswith(f"# Launch: grasp {kind} recipes/trl/{kind}.yaml")
    _, config, model, _ = make_parser(kind).parse_args_and_config(
        ["--config", str(recipe), "--use_cpu", "true", "--bf16", "false"]
    )
    assert config.grasp_enabled and config.grasp_projection == "both" and model.use_peft
    assert getattr(config, CHECKPOINTING) is True  # the recipe's activation_checkpointing, under either name


@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
def test_either_checkpointing_name_works_without_a_warning(name, tmp_path):
    """transformers 5.24 renamed gradient_checkpointing*; `grasp sft` takes both names on every release."""
    import warnings

    from grasp_trl.compat import CHECKPOINTING
    from grasp_trl.train_cli import make_parser

    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"output_dir: {tmp_path}\n{name}: true\n{name}_kwargs: {{use_reentrant: false}}\n")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*", category=FutureWarning)
        _, config, _, _ = make_parser("sft").parse_args_and_config(
            ["--config", str(config_file), "--use_cpu", "true", "--bf16", "false"]
        )
    assert getattr(config, CHECKPOINTING) is True
    assert getattr(config, f"{CHECKPOINTING}_kwargs") == {"use_reentrant": False}


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_yaml_run_with_flag_overrides(kind, tmp_path):
    from grasp_trl.cli import main

    base = make_base(tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    rows = sft_dataset(32) if kind == "sft" else dpo_dataset(32)
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    flags = [
        "--model_name_or_path",
        str(base),
        "--dtype",
        "float32",
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-2",
        "--bf16",
        "false",
        "--use_cpu",
        "true",
        "--activation_checkpointing",
        "false",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--save_strategy",
        "no",
        "--grasp_projection",
        "both",
        "--grasp_num_directions",
        "1",
    ]
    if kind == "sft":
        flags += ["--grasp_identify_steps", "3"]
    else:
        flags += [
            "--grasp_directions",
            str(DirectionSet.random(32, 2, 1).save(tmp_path / "d.safetensors")),
            "--max_length",
            "32",
        ]
    assert main([kind, str(RECIPES / f"{kind}.yaml"), *flags]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / DIRECTIONS_FILENAME).is_file()
    if kind == "sft":
        assert (out / STAGE1_DIRNAME / "spectrum.json").is_file()
    leakage = saved_lora_leakage(out, DirectionSet.load(out / DIRECTIONS_FILENAME))
    assert max(leakage.values()) <= 1e-6
