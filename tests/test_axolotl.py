"""The Axolotl plugin: schema and validation (fast, in process) and real `axolotl train` runs on CPU (slow).

The runs use a tiny local llama and local JSONL, a few fp32 steps each, `grasp_projection: both`, and check the
weight-space invariant from the files the run left in `output_dir` (adapter + direction file), never from
in-process state: for every constrained writer ||U^T dW|| <= 1e-6 ||dW||, for every reader ||dW U|| <= 1e-6 ||dW||.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from packaging.version import Version

from axolotl_fixtures import AXOLOTL, assert_invariant, cpu_config, lora_moved, run_axolotl, saved_leakage, write_data
from grasp_trl.config import DIRECTIONS_FILENAME, STAGE1_DIRNAME, GraspArguments, grasp_field_names
from grasp_trl.directions import DirectionSet, sha256_of
from grasp_trl.tiny import save_tiny_model
from testing_utils import lora_model, randomise_lora_b

try:
    AXOLOTL_VERSION = Version(importlib.metadata.version("axolotl"))
except importlib.metadata.PackageNotFoundError:
    AXOLOTL_VERSION = None
# Every test here needs Axolotl; the CI leg `newest` has none (tools/legs.sh).
pytestmark = pytest.mark.skipif(
    AXOLOTL_VERSION is None, reason="Axolotl is not installed (pip install 'grasp-trl[axolotl]')"
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes" / "axolotl").glob("*.yaml"))
HIDDEN, LAYERS = 32, 2
# What `axolotl train` would detect on a CUDA GPU, so that bf16 recipes validate on this CPU box.
GPU = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}
# Axolotl >= 0.21 loads GraspPlugin through the `axolotl.plugins` entry point (pyproject.toml) in every run, so
# `grasp: true` works without a `plugins:` line; 0.19 loads only listed plugins and drops the keys.
ENTRY_POINT = AXOLOTL_VERSION is not None and AXOLOTL_VERSION >= Version("0.21")


@pytest.fixture(autouse=True)
def fresh_plugin_registry(monkeypatch):
    """Each test starts with an empty Axolotl plugin registry. It is a process-wide singleton, and Axolotl 0.21
    merges the settings of every plugin registered in the process into the config schema during validation
    (0.19 only those of the listed plugins), so what one test registered would change what the next validates."""
    from axolotl.integrations.base import PluginManager

    monkeypatch.setattr(PluginManager, "_instance", None)
    monkeypatch.setattr(PluginManager, "plugins", collections.OrderedDict())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One tiny model dir, the JSONL data and a random direction file, shared by every test here."""
    root = tmp_path_factory.mktemp("axolotl")
    model_dir = save_tiny_model(root / "model", "llama", hidden_size=HIDDEN, num_layers=LAYERS)
    directions = DirectionSet.random(HIDDEN, LAYERS, k=2, seed=3).save(root / "directions.safetensors")
    return {"root": root, "model": model_dir, "data": write_data(root / "data"), "directions": directions}


def validate(cfg: dict):
    """Axolotl's own config validation with the plugins the config lists (what `axolotl train` runs first)."""
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(copy.deepcopy(cfg))
    prepare_plugins(cfg)
    return validate_config(cfg, capabilities=GPU, env_capabilities={"torch_version": torch.__version__.split("+")[0]})


# ---------------------------------------------------------------------------------------- schema, fast
def test_grasp_args_declares_every_grasp_key_with_the_trl_defaults():
    from axolotl_plugin.args import GraspArgs

    assert set(GraspArgs.model_fields) == set(grasp_field_names()) | {"grasp"}
    for field in dataclasses.fields(GraspArguments):
        assert GraspArgs.model_fields[field.name].default == field.default, field.name
        assert GraspArgs.model_fields[field.name].description == field.metadata["help"], field.name


def test_grasp_keys_survive_axolotl_validation_with_the_plugin(workspace):
    cfg = cpu_config(
        workspace["model"],
        workspace["data"],
        workspace["root"] / "v",
        grasp_layers=[1, 0],
        grasp_directions=str(workspace["directions"]),
        grasp_target_modules={"o_proj": "write"},
    )
    validated = validate(cfg)
    assert validated["grasp"] is True and validated["grasp_projection"] == "both"
    assert validated["grasp_directions"] == str(workspace["directions"])
    assert validated["grasp_layers"] == [0, 1]  # normalised by validate_grasp_fields
    assert validated["grasp_target_modules"] == {"o_proj": "write"}
    assert validated["grasp_num_directions"] == GraspArguments.grasp_num_directions


def test_without_the_plugins_line_only_axolotl_0_19_drops_grasp(workspace):
    """No `plugins:` entry: Axolotl 0.19 drops `grasp: true` without an error (the fact the README warns about);
    Axolotl 0.21 has loaded the plugin from its entry point and keeps every key."""
    from axolotl_plugin.cli import loaded_without_plugins_line

    assert loaded_without_plugins_line() is ENTRY_POINT, "is grasp-trl installed (pip install -e .)?"
    cfg = cpu_config(
        workspace["model"], workspace["data"], workspace["root"] / "v", grasp_directions=str(workspace["directions"])
    )
    del cfg["plugins"]
    validated = validate(cfg)
    if ENTRY_POINT:
        assert validated["grasp"] is True and validated["grasp_directions"] == str(workspace["directions"])
    else:
        assert not any(key.startswith("grasp") for key in validated)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({}, "grasp: true needs grasp_directions"),
        (
            {"grasp_identify_steps": 2, "grasp_sides": "writers"},
            "grasp_sides: expected one of write, read, both; found 'writers'",
        ),
        (
            {"grasp_identify_steps": 2, "grasp_projection": "gradients"},
            "grasp_projection: expected one of activations, weights, both, clamp, ablate; found 'gradients'",
        ),
        (
            {"grasp_identify_steps": 2, "grasp_scope": "layer"},
            "grasp_scope: expected one of per_layer, global; found 'layer'",
        ),
        ({"grasp_identify_steps": 0}, "grasp_identify_steps: expected a positive number of steps or 'auto'; found 0"),
        ({"grasp_identify_steps": 2, "grasp_layers": [-1]}, "grasp_layers: expected a list of non-negative"),
        ({"grasp_identify_steps": 2, "grasp_target_modules": "{not json"}, "grasp_target_modules: expected a JSON"),
        ({"grasp": None, "grasp_identify_steps": 2}, "grasp_identify_steps set but grasp is not"),
        ({"grasp_identify_steps": 2, "adapter": None}, "identification needs a LoRA run"),
    ],
)
def test_invalid_grasp_config_is_rejected_naming_key_expectation_and_value(workspace, overrides, message):
    from pydantic import ValidationError

    cfg = cpu_config(workspace["model"], workspace["data"], workspace["root"] / "v")
    cfg.update(overrides)
    cfg = {key: value for key, value in cfg.items() if value is not None}
    with pytest.raises(ValidationError, match=re.escape(message)):
        validate(cfg)


def test_value_errors_carry_the_same_message_as_the_trl_config():
    from pydantic import ValidationError

    from axolotl_plugin.args import GraspArgs

    for bad in ({"grasp_sides": "writers"}, {"grasp_scope": "x"}, {"grasp_num_directions": 0}):
        with pytest.raises(ValueError) as trl_error:
            GraspArguments(grasp_identify_steps=2, **bad)
        with pytest.raises(ValidationError, match=re.escape(str(trl_error.value))):
            GraspArgs(grasp=True, grasp_identify_steps=2, **bad)


def test_layers_out_of_range_is_an_error_once_the_model_is_known(workspace):
    from transformers import AutoModelForCausalLM

    from axolotl_plugin import check_layers

    model = AutoModelForCausalLM.from_pretrained(workspace["model"])
    check_layers([0, LAYERS - 1], model)
    with pytest.raises(
        ValueError, match=re.escape(f"grasp_layers: [{LAYERS}] out of range for a model with {LAYERS} layers")
    ):
        check_layers([0, LAYERS], model)


def _plain_trainer(output_dir: Path):
    """A real `transformers.Trainer` (the base of Axolotl's SFT trainer) on a tiny LoRA model; not trained."""
    from transformers import Trainer, TrainingArguments

    model = lora_model(hidden_size=HIDDEN, num_layers=LAYERS)
    return Trainer(model=model, args=TrainingArguments(output_dir=str(output_dir), report_to=[]))


def test_mixing_in_and_post_train_is_idempotent(workspace, tmp_path):
    """`with_grasp` reuses one class per trainer class; `post_train` twice writes the file once, unchanged."""
    from axolotl_plugin import GraspPlugin, with_grasp
    from grasp_trl.trainer import GraspTrainerMixin

    trainer = lambda: _plain_trainer(tmp_path)  # noqa: E731
    first, second = trainer(), trainer()
    assert type(with_grasp(first)) is type(with_grasp(second)) and isinstance(first, GraspTrainerMixin)
    plugin = GraspPlugin()
    cfg = {"grasp": True, "grasp_directions": str(workspace["directions"]), "output_dir": str(tmp_path)}
    plugin.post_trainer_create(cfg, trainer())
    target = tmp_path / DIRECTIONS_FILENAME
    plugin.post_train(cfg, None)
    stamp = target.stat().st_mtime_ns
    plugin.post_train(cfg, None)
    assert target.stat().st_mtime_ns == stamp and sha256_of(target) == sha256_of(workspace["directions"])


def test_readme_documents_every_key():
    from axolotl_plugin.args import GraspArgs

    readme = (REPO / "axolotl_plugin" / "README.md").read_text()
    missing = [key for key in GraspArgs.model_fields if f"| `{key}` |" not in readme]
    assert not missing, f"axolotl_plugin/README.md lacks rows for {missing}"


def test_grasp_check_catches_a_missing_plugins_line_on_0_19_and_bad_values(tmp_path):
    from click.testing import CliRunner

    from axolotl_plugin.cli import grasp_check

    def check(cfg):
        path = tmp_path / "cfg.yml"
        path.write_text(yaml.safe_dump(cfg))
        return CliRunner().invoke(grasp_check, [str(path)])

    plugin = {"plugins": ["axolotl_plugin.GraspPlugin"]}
    result = check({"grasp": True, "grasp_identify_steps": 5})
    if ENTRY_POINT:  # the plugin loads without the line
        assert result.exit_code == 0 and "GRASP on: identify after 5 naive steps" in result.output, result.output
    else:
        assert result.exit_code == 1 and "trains WITHOUT GRASP" in result.output, result.output
    result = check({**plugin, "grasp": True, "grasp_identify_steps": 5, "grasp_sides": "writers"})
    assert result.exit_code == 1 and "grasp_sides: expected one of write, read, both; found 'writers'" in result.output
    result = check({**plugin, "grasp": True, "grasp_identify_steps": 5})
    assert result.exit_code == 0 and "GRASP on: identify after 5 naive steps" in result.output, result.output
    assert check({"base_model": "x"}).exit_code == 0  # no grasp keys: nothing to complain about


def test_grasp_false_really_is_off_and_the_drift_monitor_runs_alone(workspace, tmp_path):
    from axolotl_plugin import GraspPlugin
    from grasp_trl.trainer import GraspTrainerMixin

    off = {"grasp": False, "grasp_directions": str(workspace["directions"]), "output_dir": str(tmp_path)}
    trainer = _plain_trainer(tmp_path)
    GraspPlugin().post_trainer_create(off, trainer)
    assert not isinstance(trainer, GraspTrainerMixin)
    monitor = {**off, "grasp_drift_steps": 2, "grasp_drift_directions": str(workspace["directions"])}
    trainer = _plain_trainer(tmp_path)
    GraspPlugin().post_trainer_create(monitor, trainer)
    assert trainer.grasp_projector is None and trainer.grasp_drift is not None
    assert trainer.grasp_drift in trainer.callback_handler.callbacks


# --------------------------------------------------------------------------------------- recipes, fast
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_validates_against_axolotl_schema_with_the_plugin(recipe, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes are launched from the repository root (DeepSpeed paths are relative)
    lines = recipe.read_text().splitlines()
    head = "\n".join(lines[:6]).lower()
    assert lines[0].startswith("#") and "axolotl train" in head, f"{recipe.name}: first lines must give the launch"
    assert "data" in head, f"{recipe.name}: first lines must say where the data comes from"
    cfg = yaml.safe_load(recipe.read_text())
    assert cfg["plugins"] == ["axolotl_plugin.GraspPlugin"] and cfg["grasp"] is True
    if cfg.get("deepspeed"):
        assert (REPO / cfg["deepspeed"]).is_file(), f"{recipe.name}: {cfg['deepspeed']} not found from the repo root"
    validated = validate(cfg)
    assert validated["grasp"] is True
    dropped = sorted(set(cfg) - set(validated))
    assert not dropped, f"{recipe.name}: Axolotl's schema does not know {dropped} (typo?) and dropped them"


def test_there_are_recipes():
    names = {path.name for path in RECIPES}
    assert "tiny-cpu.yaml" in names and len(names) >= 8, names


# -------------------------------------------------------------------------------- axolotl train, slow
def _check_run(proc, output_dir: Path) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert (output_dir / "adapter_model.safetensors").is_file() and (output_dir / DIRECTIONS_FILENAME).is_file()
    assert lora_moved(output_dir) > 1e-4, "the adapter did not train"
    assert_invariant(output_dir)


@pytest.mark.axolotl
@pytest.mark.slow
def test_axolotl_sft_lora_with_direction_file(workspace):
    """Default launcher (accelerate), as the README documents it."""
    out = workspace["root"] / "sft-file"
    cfg = cpu_config(workspace["model"], workspace["data"], out, grasp_directions=str(workspace["directions"]))
    proc, seconds = run_axolotl(cfg, workspace["root"] / "w-sft-file")
    print(f"axolotl train (sft, direction file, accelerate launcher): {seconds:.1f} s")
    _check_run(proc, out)
    assert sha256_of(out / DIRECTIONS_FILENAME) == sha256_of(workspace["directions"])
    assert "grasp/leakage" in proc.stdout + proc.stderr


@pytest.mark.axolotl
@pytest.mark.slow
def test_axolotl_sft_without_the_plugins_line(workspace):
    """`grasp: true` alone: GRASP through the entry point on Axolotl 0.21; on 0.19 a plain LoRA that exits 0 and
    leaves no direction file (what `axolotl grasp-check` warns about there)."""
    out = workspace["root"] / "sft-no-plugins-line"
    cfg = cpu_config(workspace["model"], workspace["data"], out, grasp_directions=str(workspace["directions"]))
    del cfg["plugins"]
    proc, seconds = run_axolotl(cfg, workspace["root"] / "w-sft-no-plugins-line", "--launcher", "python")
    print(f"axolotl train (sft, no plugins line, Axolotl {AXOLOTL_VERSION}): {seconds:.1f} s")
    log = proc.stdout + proc.stderr
    if ENTRY_POINT:
        _check_run(proc, out)
        assert "GRASP installed on GraspAxolotlTrainer" in log
    else:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
        assert lora_moved(out) > 1e-4 and not (out / DIRECTIONS_FILENAME).exists()
        assert "GRASP installed" not in log


@pytest.mark.axolotl
@pytest.mark.slow
def test_tiny_cpu_recipe_identifies_then_projects_in_one_run(tmp_path):
    """recipes/axolotl/tiny-cpu.yaml exactly as its header says to launch it (relative paths, from a fresh cwd)."""
    recipe = REPO / "recipes" / "axolotl" / "tiny-cpu.yaml"
    cfg = yaml.safe_load(recipe.read_text())
    subprocess.run(
        [sys.executable, "-m", "axolotl_plugin.tiny", "outputs/tiny"], cwd=tmp_path, check=True, capture_output=True
    )
    proc, seconds = run_axolotl(recipe, tmp_path, "--launcher", "python")
    print(f"axolotl train (tiny-cpu.yaml, identify-then-project): {seconds:.1f} s")
    out = tmp_path / cfg["output_dir"]
    _check_run(proc, out)
    stage1 = out / STAGE1_DIRNAME
    for name in ("adapter_model.safetensors", DIRECTIONS_FILENAME, "spectrum.json"):
        assert (stage1 / name).is_file(), name
    assert sha256_of(out / DIRECTIONS_FILENAME) == sha256_of(stage1 / DIRECTIONS_FILENAME)
    assert DirectionSet.load(out / DIRECTIONS_FILENAME).k(0) == cfg["grasp_num_directions"]
    # the check can fail: the naive stage-1 update does lie along the directions identified from it
    naive = saved_leakage(stage1, out / DIRECTIONS_FILENAME)
    assert max(naive.values()) > 0.1, naive


@pytest.mark.axolotl
@pytest.mark.slow
def test_axolotl_qlora_4bit_with_direction_file(workspace):
    out = workspace["root"] / "qlora"
    cfg = cpu_config(
        workspace["model"],
        workspace["data"],
        out,
        adapter="qlora",
        load_in_4bit=True,
        grasp_directions=str(workspace["directions"]),
    )
    proc, seconds = run_axolotl(cfg, workspace["root"] / "w-qlora", "--launcher", "python")
    print(f"axolotl train (qlora 4-bit): {seconds:.1f} s")
    _check_run(proc, out)
    # the base really was loaded through bitsandbytes nf4 (Axolotl saves the loaded model's config)
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["_load_in_4bit"] and quantization["bnb_4bit_quant_type"] == "nf4", quantization


@pytest.mark.axolotl
@pytest.mark.slow
def test_axolotl_dpo_with_direction_file(workspace):
    out = workspace["root"] / "dpo"
    cfg = cpu_config(
        workspace["model"], workspace["data"], out, kind="dpo", grasp_directions=str(workspace["directions"])
    )
    proc, seconds = run_axolotl(cfg, workspace["root"] / "w-dpo", "--launcher", "python")
    print(f"axolotl train (rl: dpo): {seconds:.1f} s")
    _check_run(proc, out)
    assert "GraspAxolotlDPOTrainer" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ axolotl grasp-identify
@pytest.mark.axolotl
@pytest.mark.slow
def test_axolotl_grasp_identify_command(workspace, tmp_path):
    """`axolotl grasp-identify` through Axolotl's `axolotl.cli_commands` entry point group (pyproject.toml)."""
    model = lora_model(hidden_size=HIDDEN, num_layers=LAYERS)
    randomise_lora_b(model, seed=1)
    model.save_pretrained(tmp_path / "naive")
    cfg = {
        "base_model": str(workspace["model"]),
        "output_dir": str(tmp_path / "naive"),
        "grasp_num_directions": 2,
        "grasp_scope": "global",
    }
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [AXOLOTL, "grasp-identify", str(tmp_path / "cfg.yml")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    directions = DirectionSet.load(tmp_path / "naive" / DIRECTIONS_FILENAME)
    assert directions.metadata["scope"] == "global" and directions.k(0) == 2
    assert (tmp_path / "naive" / "spectrum.json").is_file()
    assert f"grasp_directions: {tmp_path / 'naive' / DIRECTIONS_FILENAME}" in proc.stdout


def test_grasp_identify_rejects_a_directory_without_an_adapter(tmp_path):
    from click.testing import CliRunner

    from axolotl_plugin.cli import grasp_identify

    (tmp_path / "cfg.yml").write_text(yaml.safe_dump({"output_dir": str(tmp_path)}))
    result = CliRunner().invoke(grasp_identify, [str(tmp_path / "cfg.yml")])
    assert result.exit_code == 1 and f"{tmp_path}: no adapter_config.json" in result.output, result.output
