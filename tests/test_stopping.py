"""The stage-1 stopping rule (`grasp_identify_steps: auto`): snapshots agree with identification, and the
rule stops exactly where its definition says, on random spectra."""

import random
from pathlib import Path

import pytest
import torch

from grasp_trl.identify import extract_directions
from grasp_trl.lora import factors_from_peft_model
from grasp_trl.stopping import GapRule, Snapshot, snapshot
from testing_utils import lora_model, randomise_lora_b


def unit(vector):
    vector = torch.as_tensor(vector, dtype=torch.float64)
    return vector / vector.norm()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_snapshot_is_the_global_k1_identification(seed):
    model = lora_model(r=4, num_layers=3, seed=seed)
    randomise_lora_b(model, seed=seed)
    shot = snapshot(factors_from_peft_model(model), step=7)
    directions = extract_directions(model, k=1, scope="global")
    top = directions.bases[0][:, 0].double()
    assert abs(float(shot.direction @ top)) == pytest.approx(1.0, abs=1e-6)
    values = directions.metadata["singular_values"]["global"]
    assert (shot.s1, shot.s2) == pytest.approx((values[0], values[1]), rel=1e-6)
    assert shot.step == 7 and shot.gap == pytest.approx(values[0] / values[1], rel=1e-6)


def test_snapshot_without_writers_is_an_error_naming_the_source():
    with pytest.raises(ValueError, match=r"stage 1's adapter: no LoRA module writes to the residual stream"):
        snapshot([], step=5, source="stage 1's adapter")


def replay(rule: GapRule, gaps, cosines):
    """Feed snapshots whose gaps and consecutive |cos| are given; return the step the rule stopped at."""
    direction = unit([1.0, 0.0])
    for index, (gap, cos) in enumerate(zip(gaps, cosines)):
        if index:  # rotate the previous direction by the angle whose cosine is `cos`
            angle = torch.arccos(torch.tensor(cos, dtype=torch.float64))
            rotation = torch.tensor(
                [[torch.cos(angle), -torch.sin(angle)], [torch.sin(angle), torch.cos(angle)]], dtype=torch.float64
            )
            direction = rotation @ direction
        if rule.update(Snapshot(5 * (index + 1), direction, float(gap), 1.0)):
            return 5 * (index + 1)
    return None


@pytest.mark.parametrize("seed", range(20))
def test_rule_stops_at_the_first_stable_snapshot_past_the_drop(seed):
    """Property on random gap sequences: the rule's stop equals a direct reading of its definition."""
    rng = random.Random(seed)
    gaps = [rng.uniform(1.0, 4.0) for _ in range(30)]
    cosines = [1.0] + [rng.choice([0.999, 0.99, 0.5]) for _ in range(29)]
    expected = None
    for index in range(1, 30):
        peak = max(gaps[: index + 1])
        if cosines[index] >= 0.95 and gaps[index] <= 0.9 * peak:
            expected = 5 * (index + 1)
            break
    assert replay(GapRule(), gaps, cosines) == expected


def test_rule_waits_for_a_stable_direction_and_honours_the_budget():
    rising_then_falling = [2.0, 3.0, 3.0, 2.5, 2.0]
    assert replay(GapRule(), rising_then_falling, [1.0, 1.0, 1.0, 1.0, 1.0]) == 20  # 2.5 <= 0.9 * 3
    assert replay(GapRule(), rising_then_falling, [1.0, 1.0, 1.0, 0.3, 1.0]) == 25  # unstable at step 20
    rule = GapRule(max_steps=10)
    assert replay(rule, [2.0, 3.0, 3.5, 4.0], [1.0] * 4) == 10 and "budget" in rule.stop_reason
    rule = GapRule()
    replay(rule, rising_then_falling, [1.0] * 5)
    assert [row["step"] for row in rule.trace()] == [5, 10, 15, 20] and rule.trace()[0]["cos_previous"] is None


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("every", 0, "every: expected a positive number"),
        ("drop", 1.0, r"drop: expected a fraction in \(0, 1\)"),
        ("min_cos", 1.5, r"min_cos: expected a value in \[0, 1\]"),
    ],
)
def test_rule_rejects_meaningless_parameters(field, value, message):
    with pytest.raises(ValueError, match=message):
        GapRule(**{field: value})


def test_two_run_workflow_picks_the_step_the_one_run_rule_stops_at(tmp_path):
    """`grasp identify RUN --auto` on a naive run's checkpoints (every 2 steps) chooses the checkpoint at which
    `grasp_identify_steps: auto` (every 2, same data, seed and schedule) stops stage 1, with the same
    directions."""
    import json

    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from grasp_trl.cli import main
    from grasp_trl.config import DIRECTIONS_FILENAME, STAGE1_DIRNAME
    from grasp_trl.directions import DirectionSet
    from grasp_trl.trainer import GraspSFTConfig, GraspSFTTrainer
    from trainer_fixtures import lora_config, make_base, sft_dataset

    base = make_base(tmp_path / "base")
    common = dict(
        max_steps=10,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        logging_steps=1,
    )
    set_seed(0)
    SFTTrainer(
        model=str(base),
        args=SFTConfig(
            output_dir=str(tmp_path / "naive"), save_strategy="steps", save_steps=2, save_only_model=True, **common
        ),
        train_dataset=sft_dataset(),
        peft_config=lora_config(),
    ).train()
    assert (
        main(
            [
                "identify",
                str(tmp_path / "naive"),
                "--auto",
                "-k",
                "1",
                "--scope",
                "global",
                "-o",
                str(tmp_path / "two.safetensors"),
            ]
        )
        == 0
    )
    two_run = DirectionSet.load(tmp_path / "two.safetensors")
    chosen = int(Path(two_run.metadata["stopping"]["checkpoint"]).name.split("-")[1])

    set_seed(0)
    one = GraspSFTTrainer(
        model=str(base),
        args=GraspSFTConfig(
            output_dir=str(tmp_path / "one"),
            save_strategy="no",
            grasp_identify_steps="auto",
            grasp_identify_every=2,
            grasp_num_directions=1,
            grasp_scope="global",
            **common,
        ),
        train_dataset=sft_dataset(),
        peft_config=lora_config(),
    )
    one.train()
    stage1 = tmp_path / "one" / STAGE1_DIRNAME
    assert json.loads((stage1 / "spectrum.json").read_text())["stopping"]["stopped_at"] == chosen
    one_run = DirectionSet.load(stage1 / DIRECTIONS_FILENAME)
    assert abs(float(one_run.bases[0][:, 0] @ two_run.bases[0][:, 0])) == pytest.approx(1.0, abs=1e-5)


def test_two_run_workflow_errors_name_the_run_directory(tmp_path):
    from grasp_trl.stopping import checkpoints

    with pytest.raises(FileNotFoundError, match="nope: run directory not found"):
        checkpoints(tmp_path / "nope")
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(ValueError, match=r"needs at least 2 checkpoint-N adapter directories, found 0"):
        checkpoints(tmp_path)
