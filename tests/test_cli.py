"""The `grasp` CLI: inspect (plot, logit lens), probe and import, and every error path as one line + exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from grasp_trl import cli
from grasp_trl.directions import DirectionSet
from grasp_trl.tiny import build_model, build_tokenizer, save_tiny_model
from testing_utils import randomise_lora_b

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
D, L = 32, 2


def save_adapter(directory, hidden_size=D, seed=0):
    model = build_model("llama", vocab_size=len(build_tokenizer()), hidden_size=hidden_size, num_layers=L, seed=seed)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]))
    randomise_lora_b(model, seed=seed, scale=0.5)
    model.save_pretrained(directory)
    return Path(directory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny_model(root / "base", "llama", hidden_size=D, num_layers=L, seed=0)
    adapter = save_adapter(root / "adapter")
    directions = DirectionSet.random(D, L, 1, seed=2).save(root / "dirs.safetensors")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w00{i} w01{i} w02{i}"}) + "\n" for i in range(8)))
    return {"root": root, "base": base, "adapter": adapter, "directions": directions, "prompts": prompts}


class Payload:
    """Not a tensor: saving it needs pickle, which the importer refuses."""


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, command, *needles):
    errors = [line for line in err.splitlines() if line.startswith(f"grasp {command}: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], errors[0]


def probe_args(files, **override):
    args = {
        "--model": files["base"],
        "--adapter": files["adapter"],
        "--directions": files["directions"],
        "--prompts": files["prompts"],
        **override,
    }
    return ["probe", *[item for pair in args.items() for item in pair], "--bootstrap", "100"]


def test_probe_prints_a_table_and_plots(files, capsys, tmp_path):
    code, out, err = run(capsys, *probe_args(files), "--plot", tmp_path / "probe.png")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == list(range(L))
    assert any(float(row[2]) != 0.0 for row in rows)  # the random adapter moves the stream along them
    assert (tmp_path / "probe.png").read_bytes()[:8] == PNG_MAGIC


def test_probe_error_paths_are_one_line(files, capsys, tmp_path):
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    foreign = save_adapter(tmp_path / "foreign", hidden_size=48, seed=1)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((files["adapter"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{broken")
    bad_directions = tmp_path / "bad.safetensors"
    bad_directions.write_bytes(b"garbage")
    bad_prompts = tmp_path / "bad.jsonl"
    bad_prompts.write_text('{"prompt": "w001"}\nnot json\n')
    other_model = DirectionSet.random(48, L, 1).save(tmp_path / "d48.safetensors")
    cases = [
        ({"--adapter": tmp_path / "missing"}, ["missing", "not found"]),
        ({"--adapter": not_adapter}, ["empty", "not a PEFT adapter directory"]),
        ({"--adapter": foreign}, ["foreign", "has shape", "needs", "trained on"]),
        ({"--adapter": corrupt}, ["adapter_model.safetensors", "not a readable safetensors file"]),
        ({"--directions": tmp_path / "nope.safetensors"}, ["nope.safetensors", "not found"]),
        ({"--directions": bad_directions}, ["bad.safetensors"]),
        ({"--directions": other_model}, ["hidden_size=48", "hidden_size=32"]),
        ({"--prompts": bad_prompts}, ["bad.jsonl:2", "not valid JSON"]),
        ({"--prompts": tmp_path / "none.jsonl"}, ["none.jsonl", "not found"]),
        ({"--model": tmp_path / "no_model"}, ["no_model", "not found"]),
    ]
    for override, needles in cases:
        code, _, err = run(capsys, *probe_args(files, **override))
        assert_one_error_line(code, err, "probe", *needles)


def test_debug_shows_the_traceback(files, capsys, tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", *map(str, probe_args(files, **{"--adapter": tmp_path / "missing"}))])


def test_inspect_plot_and_logit_lens(files, capsys, tmp_path):
    code, out, err = run(
        capsys, "inspect", files["directions"], "--plot", tmp_path / "i.png", "--model", files["base"], "--top", "3"
    )
    assert code == 0, err
    assert "logit lens" in out and (tmp_path / "i.png").read_bytes()[:8] == PNG_MAGIC
    lens = [line for line in out.splitlines() if " | " in line and line.split()[0].isdigit()]
    assert len(lens) == L and all(len(line.split("|")[0].split()) == 2 + 3 for line in lens)
    code, _, err = run(capsys, "inspect", tmp_path / "missing.safetensors", "--plot", tmp_path / "x.png")
    assert_one_error_line(code, err, "inspect", "missing.safetensors", "not found")
    assert not (tmp_path / "x.png").exists()
    d48 = DirectionSet.random(48, L, 1).save(tmp_path / "d48.safetensors")
    code, _, err = run(capsys, "inspect", d48, "--model", files["base"])
    assert_one_error_line(code, err, "inspect", "hidden_size=48")


def test_import_round_trip_and_errors(files, capsys, tmp_path):
    tensor = torch.randn(L + 1, D, generator=torch.Generator().manual_seed(0))
    torch.save(tensor, tmp_path / "persona.pt")
    code, out, err = run(
        capsys, "import", tmp_path / "persona.pt", "-o", tmp_path / "p.safetensors", "--model", files["base"]
    )
    assert code == 0, err
    directions = DirectionSet.load(tmp_path / "p.safetensors")
    torch.testing.assert_close(directions.bases[L - 1][:, 0], tensor[L] / tensor[L].norm())
    assert directions.metadata["base_model"] == str(files["base"])
    code, _, err = run(capsys, "import", tmp_path / "persona.pt", "-o", tmp_path / "q.safetensors", "--num-layers", 5)
    assert_one_error_line(code, err, "import", "persona.pt", "num_layers=5")
    torch.save({"v": Payload()}, tmp_path / "evil.pt")
    code, _, err = run(capsys, "import", tmp_path / "evil.pt", "-o", tmp_path / "e.safetensors")
    assert_one_error_line(code, err, "import", "evil.pt", "weights_only=True")
    assert not (tmp_path / "e.safetensors").exists()


def test_console_script_error_is_one_line_on_stderr(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = Path(sys.executable).with_name("grasp")
    done = subprocess.run(
        [str(script), "inspect", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"grasp inspect: error: {tmp_path / 'missing.safetensors'}: direction file not found"
    ]
