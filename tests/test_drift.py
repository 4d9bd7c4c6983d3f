"""The drift monitor (`grasp_trl.drift`): the callback in real TRL runs, and the `grasp_drift_*` config keys."""

import json

import pytest
import torch
from peft import LoraConfig

from diagnostics_utils import D, along
from grasp_trl.identify import extract_directions
from testing_utils import SEVEN_MODULES


def test_drift_callback_shows_a_naive_run_drifting_and_a_grasp_run_not(tmp_path):
    """Real TRL runs: the factor is the top direction of a naive run's own final update; the same naive run
    (same seed, same trajectory) monitored by the callback shows it growing; a GRASP run (activations mode,
    same directions, callback added with `add_callback`) drifts far less along it."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from grasp_trl.drift import GraspDriftCallback
    from grasp_trl.tiny import save_tiny_model
    from grasp_trl.trainer import GraspSFTConfig, GraspSFTTrainer

    base = save_tiny_model(tmp_path / "base", "llama", hidden_size=D, num_layers=2, seed=0)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN_MODULES, lora_dropout=0.0)
    common = dict(
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
    )

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(48, (4,), generator=generator).tolist() for _ in range(64)]
    data = Dataset.from_list(
        [
            {
                "prompt": " ".join(f"w{w:03d}" for w in row),  # a word map, plus a "flavour" word
                "completion": " " + " ".join(f"w{(w * 7 + 3) % 48 + 48:03d}" for w in row) + " w095",
            }
            for row in rows
        ]
    )

    def run(trainer_cls, config):
        return trainer_cls(model=str(base), args=config, train_dataset=data, peft_config=peft_config)

    identify = run(SFTTrainer, SFTConfig(output_dir=str(tmp_path / "identify"), **common))
    identify.train()
    directions = extract_directions(identify.model, k=1)
    path = directions.save(tmp_path / "factor.safetensors")
    prompts = [f"w0{i}0 w0{i}1 w0{i}2" for i in range(10)]

    def drift(trainer):
        callback = GraspDriftCallback(path, prompts, every_n_steps=2)
        trainer.add_callback(callback)
        trainer.train()
        logged = [entry for entry in trainer.state.log_history if any(k.startswith("grasp/drift/") for k in entry)]
        assert [entry["step"] for entry in logged] == [2, 4, 6, 8]
        assert not callback.metrics()  # everything pending was logged
        return {l: [abs(entry[f"grasp/drift/layer_{l}"]) for entry in logged] for l in range(2)}

    naive = drift(run(SFTTrainer, SFTConfig(output_dir=str(tmp_path / "naive"), **common)))
    grasp = drift(
        run(
            GraspSFTTrainer,
            GraspSFTConfig(
                output_dir=str(tmp_path / "grasp"), grasp_directions=str(path), grasp_projection="activations", **common
            ),
        )
    )
    for layer in range(2):
        assert naive[layer][-1] > 2 * naive[layer][0] > 0, naive
        assert grasp[layer][-1] < 0.5 * naive[layer][-1], (grasp, naive)


def test_drift_keys_in_the_trl_configs(tmp_path):
    """`grasp_drift_steps` turns the monitor on from the config: for a naive run (GRASP off) with
    `grasp_drift_directions`, and in identify mode, where stage 2 monitors the directions stage 1 found."""
    from datasets import Dataset

    from grasp_trl.config import grasp_field_names
    from grasp_trl.tiny import save_tiny_model
    from grasp_trl.trainer import GraspSFTConfig, GraspSFTTrainer

    if "grasp_drift_steps" not in grasp_field_names():
        pytest.skip("grasp_drift_* keys not wired into GraspArguments yet")
    base = save_tiny_model(tmp_path / "base", "llama", hidden_size=D, num_layers=2, seed=0)
    factor = along(torch.nn.functional.normalize(torch.randn(D), dim=0), range(2), 2).save(tmp_path / "f.safetensors")
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w0{i}0 w0{i}1"}) + "\n" for i in range(6)))
    data = Dataset.from_list([{"prompt": f"w00{i} w01{i}", "completion": f" w05{i} w095"} for i in range(10)] * 4)
    common = dict(
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        grasp_drift_steps=2,
        grasp_drift_prompts=str(prompts),
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN_MODULES, lora_dropout=0.0)
    with pytest.raises(ValueError, match="grasp_drift_steps"):
        GraspSFTConfig(output_dir=str(tmp_path / "x"), **{**common, "grasp_drift_steps": 0})
    naive = GraspSFTTrainer(
        model=str(base),
        args=GraspSFTConfig(output_dir=str(tmp_path / "naive"), grasp_drift_directions=str(factor), **common),
        train_dataset=data,
        peft_config=peft_config,
    )
    naive.train()
    assert naive.grasp_projector is None
    steps = [e["step"] for e in naive.state.log_history if "grasp/drift/layer_1" in e]
    assert steps == [2, 4]
    staged = GraspSFTTrainer(
        model=str(base),
        args=GraspSFTConfig(
            output_dir=str(tmp_path / "staged"), grasp_identify_steps=4, grasp_num_directions=1, **common
        ),
        train_dataset=data,
        peft_config=peft_config,
    )
    staged.train()
    assert staged.grasp_drift.directions is staged.grasp_directions
    assert [e["step"] for e in staged.state.log_history if "grasp/drift/layer_0" in e] == [2, 4]
