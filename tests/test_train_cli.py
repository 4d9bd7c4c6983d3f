"""`grasp sft` / `grasp dpo`: the recipes parse, and a YAML run (with flag overrides) trains with GRASP."""

import json
from pathlib import Path

import pytest

from grasp_trl.config import DIRECTIONS_FILENAME, STAGE1_DIRNAME
from grasp_trl.verify import saved_adapter_leakage
from grasp_trl.directions import DirectionSet
from trainer_fixtures import dpo_dataset, make_base, sft_dataset

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "trl"


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_recipe_parses_with_every_key_known(kind):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from grasp_trl.trainer import GraspDPOConfig, GraspSFTConfig

    config_cls = {"sft": GraspSFTConfig, "dpo": GraspDPOConfig}[kind]
    recipe = RECIPES / f"{kind}.yaml"
    assert recipe.read_text().startswith(f"# Launch: grasp {kind} recipes/trl/{kind}.yaml")
    parser = TrlParser((ScriptArguments, config_cls, ModelConfig, DatasetMixtureConfig))
    _, config, model, _ = parser.parse_args_and_config(["--config", str(recipe), "--use_cpu", "true",
                                                         "--bf16", "false"])
    assert config.grasp_enabled and config.grasp_projection == "weights" and model.use_peft


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_yaml_run_with_flag_overrides(kind, tmp_path):
    from grasp_trl.cli import main

    base = make_base(tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    rows = sft_dataset(32) if kind == "sft" else dpo_dataset(32)
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    flags = ["--model_name_or_path", str(base), "--dtype", "float32", "--dataset_name", str(data),
             "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "4",
             "--learning_rate", "1e-2", "--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false",
             "--lora_r", "4", "--lora_alpha", "8", "--save_strategy", "no", "--grasp_projection", "both",
             "--grasp_num_directions", "1"]
    if kind == "sft":
        flags += ["--grasp_identify_steps", "3"]
    else:
        from conftest import random_directions

        flags += ["--grasp_directions", str(random_directions(32, 2, 1).save(tmp_path / "d.safetensors")),
                  "--max_length", "32"]
    assert main([kind, str(RECIPES / f"{kind}.yaml"), *flags]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / DIRECTIONS_FILENAME).is_file()
    if kind == "sft":
        assert (out / STAGE1_DIRNAME / "spectrum.json").is_file()
    leakage = saved_adapter_leakage(out, DirectionSet.load(out / DIRECTIONS_FILENAME))
    assert max(leakage.values()) <= 1e-6
