"""GraspSFTTrainer / GraspDPOTrainer: off changes nothing, each mode keeps its invariant, identify-then-project
equals running stage 2 from the saved file, resume keeps the projection, bad input fails before training."""

import json

import pytest
import torch
from transformers import TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from grasp_trl.compat import checkpointing_args
from grasp_trl.config import DIRECTIONS_FILENAME, STAGE1_DIRNAME
from grasp_trl.directions import DirectionFileError, DirectionSet
from grasp_trl.modules import decoder_blocks
from grasp_trl.trainer import GraspDPOConfig, GraspDPOTrainer, GraspSFTConfig, GraspSFTTrainer
from testing_utils import block_outputs, saved_lora_leakage
from trainer_fixtures import dpo_dataset, lora_config, make_base, sft_dataset

TOL = 1e-6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="module")
def directions_file(tmp_path_factory):
    return DirectionSet.random(32, 2, k=2, seed=5).save(tmp_path_factory.mktemp("dirs") / "d.safetensors")


def common(tmp_path, steps=10, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    values.update(overrides)
    return values


def run(kind, base, tmp_path, trainer_cls=None, config_cls=None, steps=10, train=True, **overrides):
    trainer_cls = trainer_cls or {"sft": GraspSFTTrainer, "dpo": GraspDPOTrainer}[kind]
    config_cls = config_cls or {"sft": GraspSFTConfig, "dpo": GraspDPOConfig}[kind]
    extra = {"max_length": 32} if kind == "dpo" else {}
    set_seed(0)
    trainer = trainer_cls(
        model=str(base),
        args=config_cls(**common(tmp_path, steps, **extra, **overrides)),
        train_dataset=sft_dataset() if kind == "sft" else dpo_dataset(),
        peft_config=lora_config(),
    )
    if train:
        trainer.train()
    return trainer


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def adapter(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def assert_adapters_close(a, b, atol=TOL):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), (name, float((a[name] - b[name]).abs().max()))


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_off_or_empty_changes_nothing(kind, base, tmp_path):
    plain_cls = {"sft": (SFTTrainer, SFTConfig), "dpo": (DPOTrainer, DPOConfig)}[kind]
    plain = losses(run(kind, base, tmp_path / "plain", *plain_cls))
    off = losses(run(kind, base, tmp_path / "off"))
    empty_file = DirectionSet({}, 2, {"hidden_size": 32}).save(tmp_path / "empty.safetensors")
    empty = losses(run(kind, base, tmp_path / "empty", grasp_directions=str(empty_file)))
    assert len(plain) == 10
    assert plain == pytest.approx(off, abs=TOL) and plain == pytest.approx(empty, abs=TOL)


def zero_gradient_through_u(model, directions, layer):
    """The activations invariant on the trainer's own model: a loss through h_l U_l moves no parameter."""
    captured = {}
    block = decoder_blocks(model)[layer]
    handle = block.register_forward_hook(lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    model.zero_grad(set_to_none=True)
    ids = torch.randint(4, 90, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    (captured["h"] @ directions.bases[layer]).pow(2).sum().backward()
    handle.remove()
    norms = [float(p.grad.norm()) for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return max(norms, default=0.0)


MODE_CASES = [(kind, projection, False) for kind in ("sft", "dpo") for projection in ("activations", "weights", "both")]
MODE_CASES += [("sft", projection, True) for projection in ("activations", "weights", "both")] + [("dpo", "both", True)]


@pytest.mark.parametrize("kind,projection,checkpointing", MODE_CASES)
def test_each_mode_keeps_its_invariant_and_learns(kind, projection, checkpointing, base, directions_file, tmp_path):
    trainer = run(
        kind,
        base,
        tmp_path,
        steps=12,
        grasp_directions=str(directions_file),
        grasp_projection=projection,
        **checkpointing_args(checkpointing),
    )
    history = losses(trainer)
    assert history[-1] < history[0], history
    directions = DirectionSet.load(directions_file)
    logged = [e for e in trainer.state.log_history if "grasp/leakage" in e]
    shares = {"activations": ["residual"], "weights": ["weight"], "both": ["residual", "weight"]}[projection]
    assert len(logged) == 12 and all(f"grasp/{share}_grad_removed_fraction" in e for e in logged for share in shares)
    trainer.save_model()
    assert (tmp_path / DIRECTIONS_FILENAME).read_bytes() == directions_file.read_bytes()
    if projection in ("weights", "both"):
        leakage = saved_lora_leakage(tmp_path, directions)
        assert len(leakage) == 14 and max(leakage.values()) <= TOL, leakage
    if projection in ("activations", "both"):
        trainer.model.train()
        for layer in (0, 1):
            assert zero_gradient_through_u(trainer.model, directions, layer) <= 1e-6
        assert 0 < logged[-1]["grasp/residual_grad_removed_fraction"] < 1


def adam_first_moment_leakage(trainer):
    """Largest relative component of AdamW's first moment along the directions, over the LoRA factors the
    projector constrains (weights mode) or monitors (activations mode)."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    worst = 0.0
    for constraint in trainer.grasp_projector.monitored:
        moment = optimizer.state[constraint.param]["exp_avg"]
        worst = max(worst, float(constraint.component(moment).norm() / moment.norm()))
    return worst


def test_optimizer_sees_projected_gradients_with_accumulation_and_clipping(base, directions_file, tmp_path):
    """Weights mode projects the accumulated gradient before clipping and AdamW (`project_gradients` after the
    last micro-batch): the first moment has no component along U. In activations mode the LoRA factors'
    gradients are not projected, so the same measure is large: the check can fail."""
    settings = dict(
        steps=6,
        grasp_directions=str(directions_file),
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        max_grad_norm=0.05,
    )
    weights = run("sft", base, tmp_path / "weights", grasp_projection="weights", **settings)
    assert not weights.grasp_projector.grad_hooks and len(weights.grasp_projector.constraints) == 14
    assert adam_first_moment_leakage(weights) <= TOL
    activations = run("sft", base, tmp_path / "activations", grasp_projection="activations", **settings)
    assert adam_first_moment_leakage(activations) > 1e-2


def test_identify_then_project_equals_stage2_from_saved_file(base, tmp_path):
    one_call = run(
        "sft", base, tmp_path / "one", grasp_identify_steps=6, grasp_num_directions=2, grasp_projection="both"
    )
    stage1 = tmp_path / "one" / STAGE1_DIRNAME
    for name in ("adapter_model.safetensors", "adapter_config.json", DIRECTIONS_FILENAME, "spectrum.json"):
        assert (stage1 / name).is_file(), name
    spectrum = json.loads((stage1 / "spectrum.json").read_text())
    assert set(spectrum["k"].values()) == {2}
    from_file = run(
        "sft", base, tmp_path / "two", grasp_directions=str(stage1 / DIRECTIONS_FILENAME), grasp_projection="both"
    )
    assert_adapters_close(adapter(one_call), adapter(from_file))
    assert losses(one_call) == pytest.approx(losses(from_file), abs=TOL)
    assert one_call.state.global_step == 10  # stage 2's own step count, not stage 1's


def test_identify_auto_stops_by_the_rule_and_equals_stage2_from_saved_file(base, tmp_path):
    """`grasp_identify_steps: auto`: stage 1 snapshots every 2 steps and stops where the rule's definition,
    read directly off the recorded trace, says (or at the budget); stage 2 equals running it from the saved
    file."""
    one_call = run(
        "sft",
        base,
        tmp_path / "one",
        grasp_identify_steps="auto",
        grasp_identify_every=2,
        grasp_identify_max_steps=8,
        grasp_num_directions=1,
        grasp_projection="both",
    )
    stopping = json.loads((tmp_path / "one" / STAGE1_DIRNAME / "spectrum.json").read_text())["stopping"]
    trace = stopping["trace"]
    assert [row["step"] for row in trace] == list(range(2, stopping["stopped_at"] + 1, 2))
    expected = next(
        (
            row["step"]
            for index, row in enumerate(trace)
            if index and row["cos_previous"] >= 0.95 and row["gap"] <= 0.9 * max(r["gap"] for r in trace[: index + 1])
        ),
        8,
    )
    assert stopping["stopped_at"] == expected
    from_file = run(
        "sft",
        base,
        tmp_path / "two",
        grasp_projection="both",
        grasp_directions=str(tmp_path / "one" / STAGE1_DIRNAME / DIRECTIONS_FILENAME),
    )
    assert_adapters_close(adapter(one_call), adapter(from_file))
    assert one_call.state.global_step == 10


@pytest.mark.parametrize("mode", ["clamp", "ablate"])
@pytest.mark.parametrize("kind,checkpointing", [("sft", False), ("sft", True), ("dpo", False), ("dpo", True)])
def test_forward_edit_modes_in_the_trainers(mode, kind, checkpointing, base, directions_file, tmp_path):
    """clamp and ablate through TRL's own forward (SFT, DPO with its adapter-disabled reference pass between the
    policy forward and backward, gradient checkpointing as transformers defaults to, non-reentrant, under which
    the first clamp crashed in DPO): the loss falls, and on the trained model a
    training forward's block outputs along U are the base's (clamp) or zero (ablate) to 1e-6 of |h|."""
    trainer = run(
        kind,
        base,
        tmp_path,
        steps=12,
        grasp_directions=str(directions_file),
        grasp_projection=mode,
        gradient_checkpointing=checkpointing,
    )
    history = losses(trainer)
    assert history[-1] < history[0], history
    model, directions = trainer.model, DirectionSet.load(directions_file)
    batch = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad(), model.disable_adapter():
        reference = block_outputs(model, batch)
    if mode == "ablate":
        reference = {l: torch.zeros_like(h) for l, h in reference.items()}
    edited = block_outputs(model, batch)
    for layer, basis in directions.bases.items():
        error = ((edited[layer] - reference[layer]) @ basis).norm()
        assert error <= TOL * edited[layer].norm(), (layer, float(error))
    trainer.grasp_projector.detach()  # bypass: the trained model does put its own content along U
    plain = block_outputs(model, batch)
    assert any(((plain[l] - reference[l]) @ b).norm() > 1e-3 * plain[l].norm() for l, b in directions.bases.items())


@pytest.mark.parametrize("projection", ["weights", "activations"])
def test_resume_from_checkpoint_keeps_projection(projection, base, directions_file, tmp_path):
    full = run("sft", base, tmp_path / "full", grasp_directions=str(directions_file), grasp_projection=projection)
    interrupted = run(
        "sft",
        base,
        tmp_path / "cut",
        steps=10,
        train=False,
        grasp_directions=str(directions_file),
        grasp_projection=projection,
        save_strategy="steps",
        save_steps=5,
    )
    interrupted.add_callback(StopAt(5))  # the run dies half-way, right after checkpoint-5
    interrupted.train()
    checkpoint = tmp_path / "cut" / "checkpoint-5"
    assert (checkpoint / DIRECTIONS_FILENAME).is_file()
    resumed = run(
        "sft",
        base,
        tmp_path / "cut",
        train=False,
        grasp_identify_steps=3,
        grasp_projection=projection,
        save_strategy="steps",
        save_steps=5,
    )  # identify keys ignored: the checkpoint's file wins
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.grasp_projector is not None
    assert not (tmp_path / "cut" / STAGE1_DIRNAME).exists()
    assert_adapters_close(adapter(full), adapter(resumed), atol=1e-5)
    if projection == "weights":
        leakage = saved_lora_leakage(tmp_path / "cut" / "checkpoint-10", DirectionSet.load(directions_file))
        assert max(leakage.values()) <= TOL


def test_resume_with_other_directions_is_an_error(base, directions_file, tmp_path):
    first = run(
        "sft", base, tmp_path, steps=2, grasp_directions=str(directions_file), save_strategy="steps", save_steps=2
    )
    other = DirectionSet.random(32, 2, k=1, seed=9).save(tmp_path / "other.safetensors")
    second = run("sft", base, tmp_path, steps=4, train=False, grasp_directions=str(other))
    with pytest.raises(DirectionFileError, match="other directions"):
        second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert first.state.global_step == 2


def test_model_card_mentions_grasp_and_hash(base, directions_file, tmp_path):
    from grasp_trl.directions import sha256_of

    trainer = run("sft", base, tmp_path, steps=2, grasp_directions=str(directions_file))
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert "## GRASP" in card and sha256_of(directions_file) in card and DIRECTIONS_FILENAME in card


def test_bad_input_fails_before_training(base, directions_file, tmp_path):
    with pytest.raises(DirectionFileError, match="nope.safetensors: direction file not found"):
        run("sft", base, tmp_path, train=False, grasp_directions=str(tmp_path / "nope.safetensors"))
    other_model = DirectionSet.random(64, 2, k=1).save(tmp_path / "other.safetensors")
    with pytest.raises(DirectionFileError, match="hidden_size=64.*hidden_size=32"):
        run("sft", base, tmp_path, train=False, grasp_directions=str(other_model))
    with pytest.raises(ValueError, match="grasp_sides: expected one of write, read, both; found 'wrte'"):
        GraspSFTConfig(output_dir=str(tmp_path), grasp_sides="wrte")
    for steps in (0, -3, "autoo", True):
        with pytest.raises(ValueError, match="grasp_identify_steps: expected a positive number of steps or 'auto'"):
            GraspSFTConfig(output_dir=str(tmp_path), grasp_identify_steps=steps)
    assert (
        GraspSFTConfig(
            output_dir=str(tmp_path), grasp_identify_steps="40", use_cpu=True, bf16=False
        ).grasp_identify_steps
        == 40
    )  # as a command line gives it
    with pytest.raises(ValueError, match="grasp_identify_max_steps: only meaningful with grasp_identify_steps: auto"):
        GraspSFTConfig(output_dir=str(tmp_path), grasp_identify_steps=40, grasp_identify_max_steps=80)
    with pytest.raises(ValueError, match="grasp_identify_every: expected a positive number of steps; found 0"):
        GraspSFTConfig(output_dir=str(tmp_path), grasp_identify_steps="auto", grasp_identify_every=0)
    with pytest.raises(ValueError, match="grasp_target_modules: expected a JSON object"):
        GraspSFTConfig(output_dir=str(tmp_path), grasp_target_modules="{not json")
    with pytest.raises(DirectionFileError, match=r"grasp_layers: \[5\] out of range"):
        run("sft", base, tmp_path, train=False, grasp_directions=str(directions_file), grasp_layers=[5])
    assert not any(tmp_path.glob("checkpoint-*"))


def test_checkpoints_record_the_directions_projected_even_if_the_file_changes(base, directions_file, tmp_path):
    """The direction file is read once, at install: regenerating it mid-run changes neither what is projected nor
    what checkpoints and the output record, and each checkpoint's trainer_state.json holds its sha256."""
    import hashlib
    import shutil

    path = tmp_path / "d.safetensors"
    shutil.copyfile(directions_file, path)
    projected = path.read_bytes()

    class Regenerate(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                DirectionSet.random(32, 2, k=1, seed=11).save(path)

    trainer = run(
        "sft",
        base,
        tmp_path / "out",
        steps=4,
        train=False,
        grasp_directions=str(path),
        save_strategy="steps",
        save_steps=2,
    )
    trainer.add_callback(Regenerate())
    trainer.train()
    trainer.save_model()
    assert path.read_bytes() != projected  # the file on disk did change
    digest = hashlib.sha256(projected).hexdigest()
    for where in (tmp_path / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-4", tmp_path / "out"):
        assert (where / DIRECTIONS_FILENAME).read_bytes() == projected, where
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["GraspCallback"]["attributes"]["directions_sha256"] == digest
    trainer.create_model_card(model_name="tiny")
    assert digest in (tmp_path / "out" / "README.md").read_text()
    (tmp_path / "out" / "checkpoint-2" / DIRECTIONS_FILENAME).write_bytes(path.read_bytes())  # replaced by hand
    resumed = run("sft", base, tmp_path / "out", steps=4, train=False, grasp_directions=str(directions_file))
    with pytest.raises(
        DirectionFileError, match="trainer_state.json records .* the file beside the checkpoint was replaced"
    ):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    (tmp_path / "out" / "checkpoint-2" / DIRECTIONS_FILENAME).unlink()
    with pytest.raises(
        DirectionFileError,
        match=f"checkpoint-2: no {DIRECTIONS_FILENAME}: the checkpoint does not record the directions",
    ):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
