"""The drift probe (`grasp_trl.probe`): a planted drift is found on the right layers with the right sign, an adapter
trained with the direction projected out reads near zero, padding changes nothing, and prompt files."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from diagnostics_utils import D, L, along, base_model, planted_adapter
from grasp_trl.directions import DirectionSet
from grasp_trl.modules import decoder_blocks
from grasp_trl.probe import DEFAULT_PROMPTS, drift_probe, load_prompts, tokenize
from grasp_trl.projection import GradientProjector
from testing_utils import SEVEN_MODULES


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
    two = drift_probe(
        model,
        tokenizer,
        prompts,
        along_basis := DirectionSet({l: torch.stack([u, w], 1) for l in range(L)}, L),
        n_bootstrap=0,
    )
    assert along_basis.k(1) == 2
    assert two.layers[1].shift >= rows[1].shift - 1e-9
    assert two.layers[1].per_direction[0] == pytest.approx(rows[1].shift, rel=1e-6)
    assert "shift" in result.table() and len(result.table().splitlines()) == 2 + L


def train_steering(tokenizer, u, project: bool, steps=10):
    """A LoRA trained on an LM loss plus a term that pays for moving block 1's output along u; optionally
    with u projected out of the residual-stream gradients at every layer."""
    torch.manual_seed(0)
    model = get_peft_model(
        base_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN_MODULES, lora_dropout=0.0)
    )
    projector = GradientProjector(model, along(u), "activations").attach() if project else None
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    captured = {}
    handle = decoder_blocks(model)[1].register_forward_hook(
        lambda module, args, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out)
    )
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
    for content, message in [
        ('{"prompt": "a"}\n{"prompt": \n', r"bad\.jsonl:2: not valid JSON"),
        ('{"question": "a"}\n', r"bad\.jsonl:1: expected a non-empty 'prompt' or 'text'"),
        ('{"prompt": ""}\n', r"bad\.jsonl:1: expected a non-empty"),
        ("\n\n", "no prompts"),
    ]:
        (tmp_path / "bad.jsonl").write_text(content)
        with pytest.raises(ValueError, match=message):
            load_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        load_prompts(tmp_path / "missing.jsonl")
