"""Inspect plots, logit lens, the drift probe, the drift callback and the importers, on tiny local models."""

import json
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model

from grasp_trl.diagnostics import cosine_matrix, logit_lens, principal_cosine
from grasp_trl.directions import DirectionFileError, DirectionSet
from grasp_trl.identify import extract_directions
from grasp_trl.importers import from_layer_tensor, import_directions, orthonormal_basis
from grasp_trl.modules import decoder_blocks
from grasp_trl.probe import DEFAULT_PROMPTS, batches, drift_probe, load_prompts, tokenize
from grasp_trl.projection import GradientProjector
from grasp_trl.tiny import build_model, build_tokenizer
from testing_utils import SEVEN_MODULES, lora_model, randomise_lora_b

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
D, L = 32, 3


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(0)
    return [" ".join(f"w{int(i):03d}" for i in torch.randint(96, (int(n),), generator=generator))
            for n in torch.randint(4, 12, (24,), generator=generator)]


@pytest.fixture(scope="module")
def u():
    return torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(5)), dim=0)


def base_model(tokenizer):
    return build_model("llama", vocab_size=len(tokenizer), hidden_size=D, num_layers=L, seed=0)


def along(vector, layers=range(L), num_layers=L):
    return DirectionSet({l: vector[:, None].clone() for l in layers}, num_layers)


# ------------------------------------------------------------------------------------------------ probe
def planted_adapter(tokenizer, prompts, u, layer=1, scale=3.0):
    """A LoRA on block `layer`'s o_proj with dW = scale * u v^T, v the mean o_proj input on the prompts (so
    v^T x > 0 on average and the block's output moves along +u)."""
    model = get_peft_model(base_model(tokenizer), LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"],
                                                            layers_to_transform=[layer], lora_dropout=0.0))
    o_proj = decoder_blocks(model)[layer].self_attn.o_proj
    inputs = []
    handle = o_proj.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    ids, mask = next(batches(tokenize(tokenizer, prompts), len(prompts)))
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    v = torch.nn.functional.normalize(inputs[0][mask.bool()].mean(0), dim=0)
    with torch.no_grad():
        o_proj.lora_A["default"].weight.zero_()[0] = v
        o_proj.lora_B["default"].weight.zero_()[:, 0] = scale * u
    return model


def test_probe_reports_a_planted_drift_on_the_right_layers_with_the_right_sign(tokenizer, prompts, u):
    model = planted_adapter(tokenizer, prompts, u, layer=1)
    result = drift_probe(model, tokenizer, prompts, along(u), n_bootstrap=300)
    rows = {row.layer: row for row in result.layers}
    assert rows[0].shift == 0.0 and rows[0].ci_low == rows[0].ci_high == 0.0  # upstream of the adapter
    for layer in (1, 2):  # the block it writes into, and downstream through the residual stream
        assert 0 < rows[layer].ci_low <= rows[layer].shift <= rows[layer].ci_high
    flipped = drift_probe(model, tokenizer, prompts, along(-u), n_bootstrap=0).as_dict()
    assert all(flipped[l] == pytest.approx(-rows[l].shift, abs=1e-9) for l in range(L))
    # an orthogonal direction sees (almost) nothing of the planted shift at the adapter's own layer
    w = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(9)), dim=0)
    w = torch.nn.functional.normalize(w - (w @ u) * u, dim=0)
    assert abs(drift_probe(model, tokenizer, prompts, along(w), n_bootstrap=0).as_dict()[1]) < 0.05 * rows[1].shift
    # k = 2: the norm of the mean shift in span(u, w) is at least the shift along u; column 0 is the u reading
    two = drift_probe(model, tokenizer, prompts, along_basis := DirectionSet(
        {l: torch.stack([u, w], 1) for l in range(L)}, L), n_bootstrap=0)
    assert along_basis.k(1) == 2
    assert two.layers[1].shift >= rows[1].shift - 1e-9
    assert two.layers[1].per_direction[0] == pytest.approx(rows[1].shift, rel=1e-6)
    assert "shift" in result.table() and len(result.table().splitlines()) == 2 + L


def train_steering(tokenizer, u, project: bool, steps=10):
    """A LoRA trained on an LM loss plus a term that pays for moving block 1's output along u; optionally
    with u projected out of the residual-stream gradients at every layer."""
    torch.manual_seed(0)
    model = get_peft_model(base_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN_MODULES,
                                                             lora_dropout=0.0))
    projector = GradientProjector(model, along(u), "activations").attach() if project else None
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    captured = {}
    handle = decoder_blocks(model)[1].register_forward_hook(
        lambda module, args, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(4, len(tokenizer), (8, 12), generator=generator)
        loss = model(input_ids=ids, labels=ids).loss - (captured["h"] @ u).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    handle.remove()
    if projector is not None:
        projector.detach()
    return model


def test_probe_is_near_zero_for_an_adapter_trained_with_the_direction_projected_out(tokenizer, prompts, u):
    naive = drift_probe(train_steering(tokenizer, u, False), tokenizer, prompts, along(u), n_bootstrap=300)
    grasp = drift_probe(train_steering(tokenizer, u, True), tokenizer, prompts, along(u), n_bootstrap=300)
    for layer in (1, 2):
        assert naive.layers[layer].ci_low > 0  # the naive run moved h along +u, clearly
        # the projected run: < 1% of the naive drift (measured ~1e-5 relative)
        assert abs(grasp.layers[layer].shift) < 0.01 * naive.layers[layer].shift
        assert abs(grasp.layers[layer].ci_high - grasp.layers[layer].ci_low) < 0.01 * naive.layers[layer].shift


def test_probe_needs_a_base_for_a_non_peft_model_and_accepts_one(tokenizer, prompts, u):
    model = base_model(tokenizer)
    with pytest.raises(ValueError, match="not a PEFT model"):
        drift_probe(model, tokenizer, prompts, along(u))
    same = drift_probe(model, tokenizer, prompts, along(u), base_model=base_model(tokenizer), n_bootstrap=50)
    assert all(row.shift == 0.0 for row in same.layers)


def test_padding_does_not_change_a_prompts_reading(tokenizer, prompts, u):
    from grasp_trl.probe import read_projections

    model = base_model(tokenizer)
    encoded = tokenize(tokenizer, prompts[:6])
    batched = read_projections(model, encoded, along(u), batch_size=6)
    single = read_projections(model, encoded, along(u), batch_size=1)
    for layer in range(L):
        torch.testing.assert_close(batched.projections[layer], single.projections[layer], atol=1e-5, rtol=1e-4)


def test_prompt_files(tmp_path):
    shipped = load_prompts(DEFAULT_PROMPTS)
    assert len(shipped) >= 90 and len(set(shipped)) == len(shipped)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "w001 w002"}\n\n{"text": "w003"}\n"w004 w005"\n')
    assert load_prompts(good) == ["w001 w002", "w003", "w004 w005"]
    for content, message in [('{"prompt": "a"}\n{"prompt": \n', r"bad\.jsonl:2: not valid JSON"),
                             ('{"question": "a"}\n', r"bad\.jsonl:1: expected a non-empty 'prompt' or 'text'"),
                             ('{"prompt": ""}\n', r"bad\.jsonl:1: expected a non-empty"),
                             ("\n\n", "no prompts")]:
        (tmp_path / "bad.jsonl").write_text(content)
        with pytest.raises(ValueError, match=message):
            load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        load_prompts(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------- importers
def test_layer_tensor_round_trip_maps_row_l_plus_1_to_block_l(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(L + 1, D, generator=generator) * 7
    for path, save in [(tmp_path / "persona.pt", lambda p: torch.save(tensor, p)),
                       (tmp_path / "persona.safetensors",
                        lambda p: __import__("safetensors.torch").torch.save_file({"vectors": tensor}, p))]:
        save(path)
        directions = import_directions(path)
        assert directions.num_layers == L and sorted(directions.bases) == list(range(L))
        for layer in range(L):
            torch.testing.assert_close(directions.bases[layer][:, 0], tensor[layer + 1] / tensor[layer + 1].norm())
        assert directions.metadata["import_format"] == "layer-tensor"
        reloaded = DirectionSet.load(directions.save(tmp_path / "out.safetensors"))
        for layer in range(L):
            torch.testing.assert_close(reloaded.bases[layer], directions.bases[layer])
    assert sorted(import_directions(tmp_path / "persona.pt", layers=[2]).bases) == [2]
    with pytest.raises(DirectionFileError, match="num_layers=5"):
        import_directions(tmp_path / "persona.pt", num_layers=5)


def test_layer_dict_round_trip_and_orthonormalisation(tmp_path):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    vectors = {"3": torch.randn(D, generator=generator), "layers.5": torch.randn(2, D, generator=generator)}
    save_file(vectors, tmp_path / "vectors.safetensors")
    directions = import_directions(tmp_path / "vectors.safetensors", num_layers=8)
    assert directions.num_layers == 8 and sorted(directions.bases) == [3, 5]
    torch.testing.assert_close(directions.bases[3][:, 0], vectors["3"] / vectors["3"].norm())
    basis = directions.bases[5]
    torch.testing.assert_close(basis.T @ basis, torch.eye(2), atol=1e-6, rtol=0)
    # same span, first column along the first vector (sign kept)
    rows = vectors["layers.5"]
    torch.testing.assert_close(basis @ (basis.T @ rows.T), rows.T, atol=1e-5, rtol=1e-5)
    assert float(basis[:, 0] @ rows[0]) == pytest.approx(float(rows[0].norm()), rel=1e-5)
    reloaded = DirectionSet.load(directions.save(tmp_path / "out.safetensors"))
    torch.testing.assert_close(reloaded.bases[5], basis)
    inferred = import_directions(tmp_path / "vectors.safetensors")
    assert inferred.num_layers == 6 and inferred.metadata["num_layers_inferred"]
    torch.save({12: torch.randn(D)}, tmp_path / "dict.pt")  # int keys through torch.load(weights_only=True)
    assert sorted(import_directions(tmp_path / "dict.pt").bases) == [12]


class NotATensor:
    pass


def test_importers_refuse_pickle_and_bad_content(tmp_path):
    torch.save({"vectors": NotATensor()}, tmp_path / "object.pt")
    with open(tmp_path / "raw.pkl", "wb") as handle:
        pickle.dump({"vectors": NotATensor()}, handle)
    for name in ("object.pt", "raw.pkl"):
        with pytest.raises(DirectionFileError, match="refused.*weights_only=True"):
            import_directions(tmp_path / name)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DirectionFileError, match="not a readable safetensors file"):
        import_directions(tmp_path / "corrupt.safetensors")
    with pytest.raises(DirectionFileError, match="zero vector"):
        from_layer_tensor(torch.zeros(L + 1, D))
    with pytest.raises(DirectionFileError, match="linearly dependent"):
        orthonormal_basis(torch.stack([torch.ones(D), 2 * torch.ones(D)]), "x")
    with pytest.raises(DirectionFileError, match="shape"):
        from_layer_tensor(torch.randn(D))
    torch.save({"layer_three": torch.randn(D), "x": torch.randn(D)}, tmp_path / "keys.pt")
    with pytest.raises(DirectionFileError, match="expected a single layer tensor"):
        import_directions(tmp_path / "keys.pt")
    with pytest.raises(FileNotFoundError):
        import_directions(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------- inspect, plots, lens
@pytest.fixture(scope="module")
def identified():
    model = lora_model(hidden_size=D, num_layers=4, r=4)
    randomise_lora_b(model)
    return extract_directions(model, k=2)


def titles(figure):
    return [ax.get_title() for ax in figure.axes if ax.get_title()]


def test_inspect_plot_has_the_expected_panels_and_is_a_png(identified, tmp_path, tokenizer):
    from matplotlib.image import imread

    from grasp_trl import plots

    figure = plots.plot_directions(identified)
    assert titles(figure) == [plots.SPECTRUM_TITLE, plots.ENERGY_TITLE, plots.COSINE_TITLE]
    assert len(figure.axes) == 4  # + the heatmap's colorbar
    path = plots.save_png(figure, tmp_path / "inspect.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and imread(path).shape[2] in (3, 4)
    readout = {0: [{"promoted": [("w001", 1.0)], "suppressed": [("w002", -1.0)]}]}
    with_lens = plots.plot_directions(identified, readout)
    assert titles(with_lens) == [plots.SPECTRUM_TITLE, plots.ENERGY_TITLE, plots.COSINE_TITLE, plots.LENS_TITLE]
    assert "w001" in with_lens.axes[3].texts[0].get_text()
    imported = from_layer_tensor(torch.randn(L + 1, D))  # no spectrum recorded: the panel says so
    assert "no spectrum" in plots.plot_directions(imported).axes[0].texts[0].get_text()


def test_cosine_matrix_is_symmetric_with_unit_diagonal(identified):
    layers, matrix = cosine_matrix(identified)
    assert layers == sorted(identified.bases)
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(torch.diagonal(matrix), torch.ones(len(layers)))
    assert matrix[0, 1] == pytest.approx(principal_cosine(identified.bases[0], identified.bases[1]))
    assert float(matrix.max()) <= 1 + 1e-6


def test_logit_lens_reads_a_direction_through_final_norm_and_unembedding(tokenizer):
    model = build_model("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=2, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a non-trivial final norm gain, so the readout must go through it
        model.model.norm.weight.copy_(torch.rand(64, generator=generator) + 0.5)
    unembed, gain = model.lm_head.weight.detach(), model.model.norm.weight.detach()
    for promote, suppress in [(10, 20), (50, 7), (90, 33)]:
        target = (unembed[promote] - unembed[suppress]) / gain  # norm(u) is proportional to gain * u
        directions = DirectionSet({0: target / target.norm()}, 2)
        readout = logit_lens(model, tokenizer, directions, top=3)[0][0]
        assert readout["promoted"][0][0] == tokenizer.convert_ids_to_tokens(promote)
        assert readout["suppressed"][0][0] == tokenizer.convert_ids_to_tokens(suppress)
        assert readout["promoted"][0][1] > readout["promoted"][1][1]


def test_probe_plot(tokenizer, prompts, u, tmp_path):
    from grasp_trl import plots

    result = drift_probe(planted_adapter(tokenizer, prompts, u), tokenizer, prompts, along(u), n_bootstrap=50)
    figure = plots.plot_probe(result)
    assert titles(figure) == [plots.PROBE_TITLE]
    assert plots.save_png(figure, tmp_path / "probe.png").read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------------------------- callback
def test_drift_callback_shows_a_naive_run_drifting_and_a_grasp_run_not(tmp_path):
    """Real TRL runs: the factor is the top direction of a naive run's own final update; the same naive run
    (same seed, same trajectory) monitored by the callback shows it growing; a GRASP run (activations mode,
    same directions, callback added with `add_callback`) drifts far less along it."""
    from trl import SFTConfig, SFTTrainer

    from datasets import Dataset

    from grasp_trl.drift import GraspDriftCallback
    from grasp_trl.tiny import save_tiny_model
    from grasp_trl.trainer import GraspSFTConfig, GraspSFTTrainer

    base = save_tiny_model(tmp_path / "base", "llama", hidden_size=D, num_layers=2, seed=0)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN_MODULES, lora_dropout=0.0)
    common = dict(max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=100,
                  save_strategy="no", report_to=[], seed=0, use_cpu=True)

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(48, (4,), generator=generator).tolist() for _ in range(64)]
    data = Dataset.from_list([{"prompt": " ".join(f"w{w:03d}" for w in row),  # a word map, plus a "flavour" word
                               "completion": " " + " ".join(f"w{(w * 7 + 3) % 48 + 48:03d}" for w in row) + " w095"}
                              for row in rows])

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
    grasp = drift(run(GraspSFTTrainer, GraspSFTConfig(output_dir=str(tmp_path / "grasp"), grasp_directions=str(path),
                                                      grasp_projection="activations", **common)))
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
    common = dict(max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=100,
                  save_strategy="no", report_to=[], seed=0, use_cpu=True, grasp_drift_steps=2,
                  grasp_drift_prompts=str(prompts))
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN_MODULES, lora_dropout=0.0)
    with pytest.raises(ValueError, match="grasp_drift_steps"):
        GraspSFTConfig(output_dir=str(tmp_path / "x"), **{**common, "grasp_drift_steps": 0})
    naive = GraspSFTTrainer(model=str(base), args=GraspSFTConfig(output_dir=str(tmp_path / "naive"),
                            grasp_drift_directions=str(factor), **common), train_dataset=data, peft_config=peft_config)
    naive.train()
    assert naive.grasp_projector is None
    steps = [e["step"] for e in naive.state.log_history if "grasp/drift/layer_1" in e]
    assert steps == [2, 4]
    staged = GraspSFTTrainer(model=str(base), args=GraspSFTConfig(output_dir=str(tmp_path / "staged"),
                             grasp_identify_steps=4, grasp_num_directions=1, **common), train_dataset=data,
                             peft_config=peft_config)
    staged.train()
    assert staged.grasp_drift.directions is staged.grasp_directions
    assert [e["step"] for e in staged.state.log_history if "grasp/drift/layer_0" in e] == [2, 4]
