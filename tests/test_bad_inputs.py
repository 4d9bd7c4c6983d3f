"""Bad inputs, as a new user would give them, run as a table: each case asserts the exit status (or the exception /
warning a library call gives), that the message is one line naming the file or field with what was expected and
what was found, and that no file under the shared workspace changed (sha256 of every file before and after).

The rules (issue #14): never destroy an input or a record of what was projected; a configuration that projects
nothing is an error; degenerate adapters are named; unknown `grasp*` keys are errors; everything checkable is
checked before stage 1; messages name the path given and the real cause; numbers that would make a result
meaningless are refused. Every case fails when the check it covers is removed.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from grasp_trl import cli
from grasp_trl.config import DIRECTIONS_FILENAME, STAGE1_DIRNAME
from grasp_trl.directions import DirectionSet
from grasp_trl.tiny import build_model, build_tokenizer, save_tiny_model
from testing_utils import randomise_lora_b
from trainer_fixtures import sft_dataset

D, L = 32, 2
HAS_AXOLOTL = importlib.util.find_spec("axolotl") is not None
needs_axolotl = pytest.mark.skipif(not HAS_AXOLOTL, reason="Axolotl is not installed")
PLUGINS = ["axolotl_plugin.GraspPlugin"]


def save_adapter(directory: Path, *, targets=("o_proj", "down_proj"), r=2, scale=0.5, poison=False) -> Path:
    """A tiny LoRA adapter: random B (`scale` 0 leaves it untrained: B = 0), or one NaN in layer 1's o_proj B."""
    model = build_model("llama", vocab_size=len(build_tokenizer()), hidden_size=D, num_layers=L, seed=0)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    if scale:
        randomise_lora_b(model, seed=0, scale=scale)
    if poison:
        with torch.no_grad():
            dict(model.named_parameters())["base_model.model.model.layers.1.self_attn.o_proj.lora_B.default.weight"][
                0, 0
            ] = float("nan")
    model.save_pretrained(directory)
    return directory


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every input the cases use, in one directory whose files must come out of every case unchanged."""
    root = tmp_path_factory.mktemp("bad_inputs")
    w = {"root": root, "base": save_tiny_model(root / "base", "llama", hidden_size=D, num_layers=L, seed=0)}
    w["adapter"] = save_adapter(root / "adapter")
    w["nan_adapter"] = save_adapter(root / "nan_adapter", poison=True)
    w["zero_adapter"] = save_adapter(root / "zero_adapter", scale=0)
    w["wide_adapter"] = save_adapter(root / "wide_adapter", r=16)  # total rank 64 > hidden size 32
    for step in (5, 10):  # a naive run whose checkpoints diverged, for --auto
        shutil.copytree(w["nan_adapter"], root / "nan_run" / f"checkpoint-{step}")
    w["nan_run"] = root / "nan_run"
    w["dirs"] = DirectionSet.random(D, L, 1, seed=2).save(root / "dirs.safetensors")
    w["existing"] = DirectionSet.random(D, L, 1, seed=3).save(root / "existing.safetensors")
    w["empty"] = DirectionSet({}, L, {"hidden_size": D}).save(root / "empty.safetensors")
    w["layer0"] = DirectionSet.random(D, L, 1, seed=4, layers=[0]).save(root / "layer0.safetensors")
    other = DirectionSet.random(D, L, 1, seed=5)
    w["other_base"] = DirectionSet(other.bases, L, {"hidden_size": D, "base_model": "some-org/other-model"}).save(
        root / "other_base.safetensors"
    )
    torch.save(torch.randn(L + 1, D, D, generator=torch.Generator().manual_seed(0)), root / "full_rank.pt")
    w["full_rank"] = root / "full_rank.pt"
    (root / "blocker").write_text("a file, not a directory")
    w["blocker"] = root / "blocker"
    w["demo_dir"] = root / "demo"
    (w["demo_dir"] / "organism.png").mkdir(parents=True)  # taken by a directory: the plot could not be saved
    (w["demo_dir"] / "organism.png" / "keep").write_text("")
    w["prompts"] = root / "prompts.jsonl"
    w["prompts"].write_text("".join(json.dumps({"prompt": f"w00{i} w01{i} w02{i}"}) + "\n" for i in range(8)))
    w["sft_data"] = root / "sft_data"
    w["sft_data"].mkdir()
    (w["sft_data"] / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sft_dataset(16)))
    # A finished GRASP run: its output_dir holds the adapter and the direction file that was projected.
    w["grasp_run"] = root / "grasp_run"
    shutil.copytree(w["adapter"], w["grasp_run"])
    shutil.copyfile(w["dirs"], w["grasp_run"] / DIRECTIONS_FILENAME)
    # A finished identify-then-project run: output_dir/grasp_stage1 holds stage 1's record.
    w["finished"] = root / "finished"
    shutil.copytree(w["adapter"], w["finished"] / STAGE1_DIRNAME)
    shutil.copyfile(w["dirs"], w["finished"] / STAGE1_DIRNAME / DIRECTIONS_FILENAME)
    y = root / "yaml"
    y.mkdir()
    w["grasp_run_yml"] = write_yaml(y / "grasp_run.yml", {"output_dir": str(w["grasp_run"])})
    w["nan_yml"] = write_yaml(y / "nan.yml", {"output_dir": str(w["nan_adapter"])})
    w["typo_identify_yml"] = write_yaml(
        y / "typo_identify.yml", {"output_dir": str(w["adapter"]), "grasp_scop": "global"}
    )
    w["typo_yml"] = write_yaml(
        y / "typo.yml", {"plugins": PLUGINS, "grasp": True, "grasp_identify_steps": 5, "grasp_num_direction": 2}
    )
    w["missing_dirs_yml"] = write_yaml(
        y / "missing_dirs.yml", {"plugins": PLUGINS, "grasp": True, "grasp_directions": str(root / "nope.safetensors")}
    )
    w["plugins_str_yml"] = write_yaml(
        y / "plugins_str.yml", {"plugins": PLUGINS[0], "grasp": True, "grasp_identify_steps": 5}
    )
    w["broken_yml"] = y / "broken.yml"
    w["broken_yml"].write_text("plugins:\n  - axolotl_plugin.GraspPlugin\ngrasp: [true\n")
    return w


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------------- runners
# Each returns (code, lines): the exit status (or the exception / "warning" for library calls) and the lines
# that carry the message.
def run_grasp(w, capsys, argv):
    """`grasp ARGV` in process; a run that succeeds returns its output and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = cli.main([str(a).format(**w) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
    out, err = capsys.readouterr()
    if code == 0:
        return code, (out + err).splitlines() + [str(item.message) for item in caught]
    return code, [line for line in err.splitlines() if "error:" in line]


def run_click(w, capsys, command, argv):
    from click.testing import CliRunner

    from axolotl_plugin import cli as axolotl_cli

    result = CliRunner().invoke(getattr(axolotl_cli, command), [str(a).format(**w) for a in argv])
    assert "Traceback" not in result.output
    return result.exit_code, [line for line in result.output.splitlines() if line.startswith("Error:")]


def run_library(w, capsys, call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call(w)
        except Exception as exc:  # the message must be one line, as the CLIs print it
            return type(exc).__name__, str(exc).split("\n")
    return "warning", [
        str(item.message)
        for item in caught
        if "grasp" in str(item.filename) or str(item.message).startswith(str(w["root"]))
    ]


def axolotl_validate(cfg):
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    PluginManager._instance, PluginManager.plugins = None, collections.OrderedDict()
    cfg = DictDefault(copy.deepcopy(cfg))
    prepare_plugins(cfg)
    return validate_config(
        cfg,
        capabilities={"bf16": False, "fp8": False, "tf32": False, "n_gpu": 1, "compute_capability": "sm_90"},
        env_capabilities={"torch_version": torch.__version__.split("+")[0]},
    )


def trainer(w, *, targets=("o_proj", "down_proj"), output="out", train=False, **grasp):
    """A GraspSFTTrainer on the tiny base (2 steps, CPU); `grasp` holds the `grasp_*` overrides."""
    from grasp_trl.trainer import GraspSFTConfig, GraspSFTTrainer

    output_dir = w[output] if output in w else w["root"] / "outputs" / output
    args = GraspSFTConfig(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        **grasp,
    )
    result = GraspSFTTrainer(
        model=str(w["base"]),
        args=args,
        train_dataset=sft_dataset(16),
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=list(targets)),
    )
    if train:
        result.train()
    return result


@dataclass
class Case:
    id: str
    run: Callable  # (world, capsys) -> (code, lines)
    code: object
    needles: list[str] = field(default_factory=list)  # formatted with the world's paths
    absent: list[str] = field(default_factory=list)  # must not appear in the message
    marks: tuple = ()


def grasp(id, argv, needles, code=2, absent=(), marks=()):
    return Case(id, lambda w, capsys: run_grasp(w, capsys, argv), code, list(needles), list(absent), marks)


def click(id, command, argv, needles, absent=()):
    return Case(
        id, lambda w, capsys: run_click(w, capsys, command, argv), 1, list(needles), list(absent), (needs_axolotl,)
    )


def library(id, call, code, needles, absent=(), marks=()):
    return Case(id, lambda w, capsys: run_library(w, capsys, call), code, list(needles), list(absent), marks)


CASES = [
    # 1. Never destroy an input or a record of what was projected.
    grasp(
        "identify-onto-existing-o",
        ["identify", "{adapter}", "-o", "{existing}"],
        ["-o {existing}", "already exists", "--overwrite"],
    ),
    grasp(
        "import-onto-existing-o",
        ["import", "{full_rank}", "-o", "{existing}", "--num-layers", L],
        ["-o {existing}", "already exists", "--overwrite"],
    ),
    grasp("import-onto-its-input", ["import", "{dirs}", "-o", "{dirs}", "--overwrite"], ["-o {dirs}", "is the input"]),
    grasp(
        "identify-onto-the-adapter",
        ["identify", "{adapter}", "-o", "{adapter}/adapter_model.safetensors", "--overwrite"],
        ["adapter_model.safetensors", "is the input"],
    ),
    grasp(
        "identify-auto-onto-a-checkpoint",
        ["identify", "{nan_run}", "--auto", "-o", "{nan_run}/checkpoint-10/adapter_model.safetensors", "--overwrite"],
        ["checkpoint-10/adapter_model.safetensors", "is the input"],
    ),
    grasp("inspect-plot-onto-its-input", ["inspect", "{dirs}", "--plot", "{dirs}"], ["--plot {dirs}", "is the input"]),
    grasp(
        "probe-plot-onto-its-prompts",
        [
            "probe",
            "--model",
            "{base}",
            "--adapter",
            "{adapter}",
            "--directions",
            "{dirs}",
            "--prompts",
            "{prompts}",
            "--plot",
            "{prompts}",
        ],
        ["--plot {prompts}", "is the input"],
    ),
    grasp(
        "identify-o-under-a-file",
        ["identify", "{adapter}", "-o", "{blocker}/d.safetensors"],
        ["{blocker}/d.safetensors", "cannot write there"],
        absent=[".tmp"],
    ),
    click(
        "axolotl-identify-onto-a-grasp-run",
        "grasp_identify",
        ["{grasp_run_yml}"],
        [f"{{grasp_run}}/{DIRECTIONS_FILENAME}", "already exists", "--overwrite"],
    ),
    library(
        "stage1-onto-a-finished-run",
        lambda w: trainer(w, output="finished", grasp_identify_steps=1, train=True),
        "FileExistsError",
        [STAGE1_DIRNAME, "finished stage 1", "new output_dir"],
    ),
    # 3. A configuration that projects nothing is an error (an empty file: a loud warning, and no GRASP run).
    library(
        "grasp-layers-empty",
        lambda w: trainer(w, grasp_directions=str(w["dirs"]), grasp_layers=[]),
        "ValueError",
        ["grasp_layers", "at least one layer", "found []"],
    ),
    library(
        "grasp-layers-miss-the-file",
        lambda w: trainer(w, grasp_directions=str(w["layer0"]), grasp_layers=[1]),
        "DirectionFileError",
        ["grasp_layers: [1]", "keeps none", "layer0.safetensors"],
    ),
    library(
        "target-modules-match-nothing",
        lambda w: trainer(w, grasp_directions=str(w["dirs"]), grasp_target_modules='{"my_out": "write"}'),
        "ValueError",
        ["grasp_target_modules", "'my_out'", "matches no module", "o_proj"],
    ),
    library(
        "no-lora-module-of-the-side",
        lambda w: trainer(w, grasp_directions=str(w["dirs"]), grasp_projection="weights", grasp_sides="read"),
        "ValueError",
        ["grasp_sides=read", "no reader module", "constrain nothing"],
    ),
    library(
        "empty-direction-file-warns",
        lambda w: _assert_off(trainer(w, grasp_directions=str(w["empty"]))),
        "warning",
        ["{empty}", "no direction", "WITHOUT GRASP"],
    ),
    # 4. Degenerate adapters are named.
    grasp(
        "identify-nan-adapter",
        ["identify", "{nan_adapter}", "-o", "{root}/new.safetensors"],
        ["{nan_adapter}/adapter_model.safetensors", "layers.1.self_attn.o_proj", "lora_B", "NaN/Inf"],
    ),
    grasp(
        "identify-auto-nan-run",
        ["identify", "{nan_run}", "--auto", "-o", "{root}/new.safetensors"],
        ["checkpoint-5/adapter_model.safetensors", "NaN/Inf"],
    ),
    grasp(
        "identify-untrained-adapter",
        ["identify", "{zero_adapter}", "-o", "{root}/new.safetensors"],
        ["{zero_adapter}", "norm", "expected > 1e-08", "too small to define a direction"],
    ),
    grasp(
        "probe-nan-adapter",
        [
            "probe",
            "--model",
            "{base}",
            "--adapter",
            "{nan_adapter}",
            "--directions",
            "{dirs}",
            "--prompts",
            "{prompts}",
            "--bootstrap",
            "10",
        ],
        ["{nan_adapter}/adapter_model.safetensors", "NaN/Inf"],
    ),
    click("axolotl-identify-nan-adapter", "grasp_identify", ["{nan_yml}"], ["adapter_model.safetensors", "NaN/Inf"]),
    # 5. Unknown grasp* keys in an Axolotl YAML are errors, with a did-you-mean; grasp-check checks the rest.
    click(
        "grasp-check-typo",
        "grasp_check",
        ["{typo_yml}"],
        ["typo.yml", "grasp_num_direction", "did you mean grasp_num_directions"],
    ),
    click(
        "grasp-identify-typo",
        "grasp_identify",
        ["{typo_identify_yml}"],
        ["typo_identify.yml", "grasp_scop", "did you mean grasp_scope"],
    ),
    library(
        "axolotl-train-typo",
        lambda w: axolotl_validate(_train_cfg(w, grasp_num_direction=2)),
        "ValidationError",
        ["grasp_num_direction", "did you mean grasp_num_directions"],
        marks=(needs_axolotl,),
    ),
    click(
        "grasp-check-missing-direction-file",
        "grasp_check",
        ["{missing_dirs_yml}"],
        ["grasp_directions", "nope.safetensors", "not found"],
    ),
    click(
        "grasp-check-plugins-not-a-list",
        "grasp_check",
        ["{plugins_str_yml}"],
        ["plugins_str.yml", "plugins: expected a list", "found str"],
    ),
    click("grasp-check-broken-yaml", "grasp_check", ["{broken_yml}"], ["broken.yml", "not valid YAML", "line"]),
    # 6. Everything checkable is checked before stage 1.
    library(
        "stage1-layers-out-of-range",
        lambda w: trainer(w, grasp_identify_steps=1, grasp_layers=[5]),
        "ValueError",
        ["grasp_layers: [5] out of range", f"{L} layers"],
    ),
    library(
        "stage1-k-above-the-lora-rank",
        lambda w: trainer(w, grasp_identify_steps=1, grasp_num_directions=9),
        "ValueError",
        ["grasp_num_directions", "k=9", "total rank 8"],
    ),
    library(
        "stage1-weights-constrain-nothing",
        lambda w: trainer(w, grasp_identify_steps=1, grasp_projection="weights", grasp_sides="read"),
        "ValueError",
        ["grasp_sides=read", "no reader module"],
    ),
    library(
        "stage1-no-writer-to-identify-from",
        lambda w: trainer(w, targets=("q_proj",), grasp_identify_steps=1),
        "ValueError",
        ["grasp_identify_steps", "no writer", "nothing to identify from"],
    ),
    # 7. CLI messages name the path the user gave and the real cause.
    grasp("sft-help", ["sft", "--help"], ["usage: grasp sft"], code=0),
    grasp("sft-alone", ["sft"], ["expected a CONFIG.yaml", "found no arguments"], absent=["bf16"]),
    grasp(
        "sft-missing-config",
        ["sft", "{root}/nope.yaml"],
        ["{root}/nope.yaml", "config file not found"],
        absent=["Errno"],
    ),
    grasp(
        "import-missing-model-dir",
        ["import", "{full_rank}", "-o", "{root}/new.safetensors", "--model", "{root}/no_model"],
        ["--model {root}/no_model", "model directory not found"],
        absent=["Repo id"],
    ),
    grasp(
        "sft-missing-model-dir",
        [
            "sft",
            "--model_name_or_path",
            "{root}/no_model",
            "--dataset_name",
            "{sft_data}",
            "--output_dir",
            "{root}/outputs/sft",
            "--use_cpu",
            "true",
            "--bf16",
            "false",
        ],
        ["model_name_or_path {root}/no_model", "model directory not found"],
        absent=["Repo id"],
    ),
    grasp(
        "demo-output-dir-is-a-file",
        ["demo", "--output-dir", "{blocker}"],
        ["--output-dir {blocker}", "is a file", "expected a directory"],
    ),
    grasp(
        "demo-output-under-a-file",
        ["demo", "--output-dir", "{blocker}/demo"],
        ["--output-dir {blocker}/demo", "is a file"],
    ),
    grasp(
        "demo-output-taken-by-a-directory",
        ["demo", "--output-dir", "{demo_dir}"],
        ["--output-dir {demo_dir}/organism.png", "is a directory"],
    ),
    grasp(
        "dpo-on-sft-data",
        [
            "dpo",
            "--model_name_or_path",
            "{base}",
            "--dataset_name",
            "{sft_data}",
            "--output_dir",
            "{root}/outputs/dpo",
            "--use_cpu",
            "true",
            "--bf16",
            "false",
        ],
        ["{sft_data}", "'chosen' and 'rejected'", "found columns"],
    ),
    grasp(
        "identify-num-layers-too-small",
        ["identify", "{adapter}", "-o", "{root}/new.safetensors", "--num-layers", 1],
        ["--num-layers", "= 1", "{adapter}", "block 1"],
        absent=["<in memory>"],
    ),
    # 8. Numbers that would make a result meaningless are refused, not clamped.
    grasp(
        "identify-k-above-rank",
        ["identify", "{adapter}", "-o", "{root}/new.safetensors", "-k", 9],
        ["{adapter}", "k=9", "total rank 8"],
    ),
    grasp(
        "identify-k-equals-hidden-size",
        ["identify", "{wide_adapter}", "-o", "{root}/new.safetensors", "-k", D],
        ["directions identified from {wide_adapter}", "k < hidden_size", f"({D}, {D})"],
    ),
    grasp(
        "identify-max-k-0",
        ["identify", "{adapter}", "-o", "{root}/new.safetensors", "--energy", "0.9", "--max-k", 0],
        ["max_k", "positive integer", "found 0"],
    ),
    library(
        "grasp-energy-true",
        lambda w: trainer(w, grasp_identify_steps=1, grasp_energy=True),
        "ValueError",
        ["grasp_energy", "fraction", "found True"],
    ),
    grasp(
        "import-k-equals-hidden-size",
        ["import", "{full_rank}", "-o", "{root}/new.safetensors"],
        ["layers.0.basis", "k < hidden_size", f"({D}, {D})"],
    ),
    grasp(
        "probe-directions-of-another-base",
        [
            "probe",
            "--model",
            "{base}",
            "--adapter",
            "{adapter}",
            "--directions",
            "{other_base}",
            "--prompts",
            "{prompts}",
            "--bootstrap",
            "10",
        ],
        ["some-org/other-model", "{base}", "mean nothing"],
        code=0,
    ),
]


def _assert_off(trainer_):
    assert trainer_.grasp_projector is None  # so no GRASP model card and no direction file in the outputs


def _train_cfg(w, **extra):
    return {
        "base_model": str(w["base"]),
        "datasets": [{"path": str(w["sft_data"]), "type": "completion"}],
        "output_dir": str(w["root"] / "outputs" / "axolotl"),
        "adapter": "lora",
        "lora_r": 2,
        "lora_alpha": 4,
        "lora_target_modules": ["o_proj"],
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 1e-3,
        "sequence_len": 64,
        "plugins": PLUGINS,
        "grasp": True,
        "grasp_identify_steps": 5,
        **extra,
    }


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case, world, capsys):
    before = snapshot(world["root"])
    code, lines = case.run(world, capsys)
    needles = [n.format(**world) for n in case.needles]
    matching = [line for line in lines if all(n in line for n in needles)]
    assert code == case.code, (code, lines)
    assert len(matching) == 1, f"expected one line with {needles}; found {lines}"
    assert not any(n.format(**world) in matching[0] for n in case.absent), matching[0]
    assert "Traceback" not in matching[0]
    assert snapshot(world["root"]) == before, "a file in the workspace changed"


def test_direction_files_get_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        path = DirectionSet.random(D, L, 1).save(tmp_path / "d.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_overwrite_replaces_an_existing_o_file(world, tmp_path, capsys):
    """The refusal has its explicit way out, and it writes what was asked."""
    target = tmp_path / "d.safetensors"
    shutil.copyfile(world["existing"], target)
    code, lines = run_grasp(world, capsys, ["identify", "{adapter}", "-o", str(target), "--overwrite"])
    assert code == 0, lines
    assert DirectionSet.load(target).metadata["source_adapter"] == str(world["adapter"].resolve())
