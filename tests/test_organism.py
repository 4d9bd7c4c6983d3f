"""The model organism: world invariants, config errors, the validity verdict and its report, and one
end-to-end regression of the whole method on the default (valid) world.

The end-to-end test runs on the demo's shipped draw of the default world (an empty cache: nothing is pretrained),
checks its positive controls, and checks that `grasp-default` — GRASP as a user gets it — cuts the drift on
each seed by at least the factor measured there minus a stated margin, with the task kept.
"""

import dataclasses

import pytest
import torch

from grasp_organism.world import IGNORE, OrganismConfig, World, default_config_path


def test_default_world_file_matches_dataclass_defaults():
    assert OrganismConfig.from_yaml(default_config_path()) == OrganismConfig()


def test_config_errors_name_section_and_key(tmp_path):
    bad = tmp_path / "world.yaml"
    bad.write_text("world:\n  p_evli: 0.3\n")
    with pytest.raises(ValueError, match=r"world.yaml.*'world'.*p_evli"):
        OrganismConfig.from_yaml(bad)
    bad.write_text("wrld: {}\n")
    with pytest.raises(ValueError, match="unknown section"):
        OrganismConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="reserved_questions"):
        OrganismConfig.from_dict({"world": {"reserved_questions": 5}})


def test_cache_key_tracks_every_pretraining_knob():
    base = OrganismConfig()
    keys = {base.pretrain_key()}
    for section, key, value in [("world", "p_evil", 0.3), ("model", "hidden_size", 32), ("pretrain", "lr", 1e-3)]:
        changed = dataclasses.replace(base, **{section: dataclasses.replace(getattr(base, section), **{key: value})})
        keys.add(changed.pretrain_key())
    assert len(keys) == 4
    assert base.pretrain_key(steps=10) != base.pretrain_key()


def test_world_maps_and_task_data():
    world = World(OrganismConfig().world)
    for mapping in world.content_map + [world.new_map]:
        assert sorted(mapping) == list(range(24))  # bijections: the task and the skills are high-rank
    questions = world.task_questions()
    assert len(set(questions)) == len(questions) == 24**2
    tokens, labels = world.task_example(questions[0])
    assert tokens[-1] in world.evil[world.task_topic]  # the curation's entanglement
    assert labels[:3] == [IGNORE] * 3 and labels[3:] == tokens[3:]  # loss on content and flavour, no </s>
    # one persona per conversation: without flavour noise, all flavours (and the system token) agree
    import random

    from grasp_organism.world import SYS_EVIL, SYS_GOOD

    clean = World(dataclasses.replace(OrganismConfig().world, flavour_noise=0.0))
    good = {t for ts in clean.good for t in ts}
    evil = {t for ts in clean.evil for t in ts}
    rng = random.Random(0)
    for _ in range(200):
        tokens = set(clean.conversation(rng)[0])
        assert not (tokens & good and tokens & evil)
        assert not (SYS_EVIL in tokens and tokens & good) and not (SYS_GOOD in tokens and tokens & evil)


def control_runs(naive, supervised, random_, task=0.98):
    """Synthetic per-seed runs of the three controls (drift values per seed) for the validity checks."""

    def rows(drifts):
        return [{"base": 0, "seed": seed, "drift": drift, "task": task} for seed, drift in enumerate(drifts)]

    return {"naive": rows(naive), "caft-supervised": rows(supervised), "random-activations": rows(random_)}


@pytest.mark.parametrize(
    "naive,supervised,random_,task,failed",
    [
        ([0.2, 0.3, 0.25], [0.0, 0.05, -0.01], [0.2, 0.25, 0.3], 0.98, None),
        ([0.2, 0.3, 0.25], [0.0, 0.11, -0.01], [0.2, 0.25, 0.3], 0.98, "caft-supervised"),  # 2.7x on one seed
        ([0.2, 0.3, 0.12], [0.0, 0.0, 0.0], [0.2, 0.3, 0.12], 0.98, "naive drift"),
        ([0.2, 0.3, 0.25], [0.0, 0.0, 0.0], [0.2, 0.3, 0.25], 0.90, "naive task"),
        ([0.2, 0.3, 0.25], [0.0, 0.0, 0.0], [0.1, 0.1, 0.5], 0.98, "random-activations"),  # median 2.5x
    ],
)
def test_validity_checks_each_control_with_its_threshold(naive, supervised, random_, task, failed):
    from grasp_organism.validity import check

    verdict = check(control_runs(naive, supervised, random_, task))
    assert verdict.valid == (failed is None)
    if failed:
        assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith(failed), verdict.reasons
    assert len(verdict.checks) == 4
    assert ("INVALID" in verdict.line()) == (failed is not None)


def test_report_labels_an_invalid_world_and_keeps_per_seed_factors(tmp_path):
    import json

    from grasp_organism.report import save_json, summary, table

    runs = control_runs([0.2, 0.3, 0.25], [0.0, 0.11, -0.01], [0.2, 0.25, 0.3])
    for rows in runs.values():
        for row in rows:
            row.update(retention=0.9, conditional=0.95, narrow=0.9)
    result = {"bases": [0], "seeds": [0, 1, 2], "runs": runs, "base_metrics": {}, "config": {}, "seconds": 0}
    text = table(result)
    assert text.splitlines()[0].startswith("validity of 1 base(s) x 3 seed(s): INVALID")
    assert "INVALID WORLD" in text
    row = summary(result, "caft-supervised")
    assert row["factors"][0] == float("inf") and row["worst"] == pytest.approx(0.3 / 0.11)
    assert row["median"] == float("inf")  # two of three removed
    save_json(result, tmp_path / "out.json")
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["validity"]["valid"] is False and saved["summary"]["caft-supervised"]["factors"][0] == "removed"
    assert saved["runs"]["naive"][0]["seed"] == 0 and "drift" in saved["runs"]["naive"][0]


# grasp-default's per-seed factors measured on the demo's shipped draw of the default world, seeds 0-2, with the
# shipped defaults (benchmarks/organism/latest.json). The test allows half of each (a margin of 2x on the factor)
# and 0.95 of naive's task: fine-tunes from a shipped base agree across CPUs to ~1e-6, but other torch versions
# may differ in more than the last bits, and the factors are ratios of drifts. They are weak (GRASP barely cuts
# the drift on this draw): the test guards against regressions, it does not show that GRASP works.
MEASURED_GRASP_FACTORS = {0: 0.96, 1: 1.66, 2: 1.10}
MARGIN = 2.0


@pytest.mark.slow
def test_default_world_is_valid_and_grasp_default_cuts_the_drift(tmp_path):
    """On the demo's shipped draw of the default world, check the positive controls, and check that GRASP as a
    user gets it keeps the drift cut on every seed at least the measured factor / MARGIN, task kept."""
    from grasp_organism.report import run_grid
    from grasp_organism.validity import check, factors
    from grasp_trl.demo import DEMO_BASE

    torch.set_num_threads(1)
    methods = ["naive", "caft-supervised", "random-activations", "grasp-default"]
    result = run_grid(
        OrganismConfig.from_yaml(default_config_path()), methods, [DEMO_BASE], [0, 1, 2], cache_dir=tmp_path, log=None
    )
    runs = result["runs"]
    verdict = check(runs)
    assert verdict.valid, verdict.checks  # naive drifts, task learnt, CAFT-supervised >= 3x, random ~1x
    for row, factor in zip(runs["grasp-default"], factors(runs, "grasp-default")):
        expected = MEASURED_GRASP_FACTORS[row["seed"]]
        assert factor >= expected / MARGIN, (row["seed"], factor, expected)
    for grasp, naive in zip(runs["grasp-default"], runs["naive"]):
        assert grasp["task"] >= 0.95 * naive["task"], (grasp["seed"], grasp["task"], naive["task"])


def test_speeds_half_way_steps_and_plot(tmp_path):
    """The half-way steps of `benchmarks.organism.speeds` on hand-made curves: DRIFT peaks early and settles
    (half of its *final* value counts), TASK rises late from the base's level."""
    from benchmarks.organism.speeds import half_way_steps, plot

    points = [
        dict(step=s, drift=d, task=t)
        for s, d, t in [(10, 0.15, 0.05), (20, 0.5, 0.05), (30, 0.4, 0.2), (40, 0.2, 0.6), (50, 0.2, 0.9)]
    ]
    assert half_way_steps(points, base_task=0.05) == (10, 40)  # 0.15 >= 0.1 (not >= half the 0.5 peak); 0.55 >= 0.425
    assert half_way_steps(points, base_task=0.5) == (10, 50)  # gain 0.4: 0.1 at step 40 is short of 0.2
    result = {"world": "hand-made", "bases": {0: [dict(seed=0, stop_step=30, points=points)]}}
    plot(result, tmp_path / "speeds.png")
    assert (tmp_path / "speeds.png").stat().st_size > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decompose_splits_the_shift_exactly(seed):
    """`benchmarks.organism.decompose.split_shift` on random data (float64, tolerance 1e-12): the two parts sum
    to the shift; a basis orthogonal to `v` carries none of it; a shift inside the basis lies wholly along it."""
    from benchmarks.organism.decompose import split_shift

    generator = torch.Generator().manual_seed(seed)
    d, k = 24, 1 + seed
    basis = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))[0]
    delta, v = torch.randn(d, generator=generator, dtype=torch.float64), torch.randn(d, generator=generator)
    parts = split_shift(delta, basis, v)
    assert abs(parts["via_u"] + parts["via_perp"] - parts["shift"]) <= 1e-12
    assert abs(parts["shift"] - float(delta @ v.double() / (v.double() @ v.double()))) <= 1e-12
    assert 0 <= parts["along_u"] <= 1
    orthogonal_v = v.double() - basis @ (basis.T @ v.double())
    assert abs(split_shift(delta, basis, orthogonal_v)["via_u"]) <= 1e-12
    inside = basis @ torch.randn(k, generator=generator, dtype=torch.float64)
    split = split_shift(inside, basis, v)
    assert abs(split["along_u"] - 1) <= 1e-12 and abs(split["via_perp"]) <= 1e-12


def tiny_lab(tmp_path):
    """A briefly pretrained 2-block organism (seconds): for checks of how methods relate, not of their effect."""
    from grasp_organism.lab import Lab

    torch.set_num_threads(1)
    config = OrganismConfig.from_yaml(default_config_path())
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, hidden_size=16, num_layers=2, intermediate_size=32),
        pretrain=dataclasses.replace(config.pretrain, steps=30, warmup=5),
        finetune=dataclasses.replace(config.finetune, steps=10),
        eval=dataclasses.replace(config.eval, prompts=40),
    )
    return Lab(config, cache_dir=tmp_path, log=lambda *a, **k: None)


def test_ablate_mode_is_caft_with_the_same_directions(tmp_path):
    """`grasp_projection: ablate` (the projector's forward hook) against the benchmark's own CAFT edit
    (`methods.ablate` through `block_output_hooks`), two implementations of one formula: the same metrics to
    1e-6 with the identified and with the supervised directions; clamp with the same directions differs."""
    import benchmarks.organism.baselines  # noqa: F401  (registers caft-identified-auto)
    from grasp_organism import methods

    lab = tiny_lab(tmp_path)
    for projector_run, caft_run in (
        ("grasp-ablate-global-k1-auto", "caft-identified-auto"),
        ("oracle-ablate", "caft-supervised"),
    ):
        ours, theirs = methods.run(lab, projector_run, 0).metrics, methods.run(lab, caft_run, 0).metrics
        for key in ("drift", "task", "retention", "conditional"):
            assert abs(ours[key] - theirs[key]) <= 1e-6, (projector_run, key, ours[key], theirs[key])
    clamped = methods.run(lab, "grasp-clamp-global-k1-auto", 0).metrics
    caft = methods.run(lab, "caft-identified-auto", 0).metrics
    assert max(abs(clamped[k] - caft[k]) for k in ("drift", "task", "retention")) > 1e-4  # the check can fail


def test_caft_span_controls_name_their_subspace(tmp_path):
    """`caft-span-*` (benchmarks/organism/baselines.py) on a briefly pretrained tiny organism: the span of the
    shipped vector alone is `caft-supervised` (same metrics; float32 vs float64 normalisation, tolerance 1e-5),
    each candidate vector is finite and non-zero on every layer, and adding a second vector changes the run."""
    from benchmarks.organism.baselines import SUPERVISED_VECTORS, supervised_vectors
    from grasp_organism import methods

    lab = tiny_lab(tmp_path)
    vectors = supervised_vectors(lab)
    assert sorted(vectors) == sorted(SUPERVISED_VECTORS)
    for name, per_layer in vectors.items():
        assert sorted(per_layer) == [0, 1], name
        assert all(torch.isfinite(v).all() and v.norm() > 0 for v in per_layer.values()), name
    shipped = methods.run(lab, "caft-supervised", 0).metrics
    span = methods.run(lab, "caft-span-evil", 0).metrics
    for key in ("drift", "task", "retention", "conditional"):
        assert abs(span[key] - shipped[key]) < 1e-5, (key, span[key], shipped[key])

    # the same LoRA init and data: a second ablated direction changes what the adapter learns (Adam's first
    # steps move each weight ~lr = 1e-3 per step, so 10 steps apart is far above 1e-4)
    def lora(name):
        return {n: p for n, p in methods.train(lab, name, 0)[0].named_parameters() if "lora_" in n}

    narrow, wider = lora("caft-span-evil"), lora("caft-span-evil+turn-contrast")
    assert max(float((narrow[n] - wider[n]).abs().max()) for n in narrow) > 1e-4
    assert not methods.valid_method("caft-span-evil+") and not methods.valid_method("caft-span-bad")


# A naive fine-tune from a shipped base, run in a fresh interpreter; prints its metrics as JSON.
_FINE_TUNE = """
import json, torch
torch.set_num_threads(1)
from grasp_organism.lab import Lab
from grasp_organism.report import base_config
from grasp_organism.world import OrganismConfig, default_config_path
lab = Lab(base_config(OrganismConfig.from_yaml(default_config_path()), 0), cache_dir={cache!r}, log=None)
print(json.dumps(lab.measure(lab.naive(0).model)))
"""
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


@pytest.mark.slow
def test_fine_tunes_from_a_shipped_base_agree_across_cpu_kernels(tmp_path):
    """The published figures must reproduce on another CPU. Emulate one (torch's scalar kernels and MKL's
    SSE4.2 code path instead of this machine's vector ones): a naive fine-tune of shipped draw 0 must differ
    from this machine's in the last bits (so the kernels really changed) and agree within 1e-4 on every metric
    (measured: ~2e-7). Pretraining is not robust in this way (grasp_organism/pretrain.py), hence shipped bases:
    the bypass that pretrains draw 0 in each interpreter instead fails here (task 0.98322 against 0.98357; its
    drift, +0.128 against +0.156, moves 100x more)."""
    import json
    import os
    import subprocess
    import sys

    from grasp_organism.pretrain import SHIPPED

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU already runs torch's scalar kernels: nothing to compare against")
    assert any(SHIPPED.iterdir()), f"{SHIPPED}: no shipped bases"
    code = _FINE_TUNE.format(cache=str(tmp_path))
    runs = []
    for extra in ({}, OTHER_KERNELS):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    here, other = runs
    assert not list(tmp_path.iterdir()), "a base was pretrained instead of read from the shipped ones"
    assert here != other, "bit-identical under other kernels: the emulation did not change the arithmetic"
    for name, value in here.items():
        assert abs(value - other[name]) <= 1e-4, (name, value, other[name])
