"""Stage 1: planted directions are recovered; the low-rank SVD equals a dense SVD; naming per architecture."""

import json

import pytest
import torch

from grasp_trl.identify import extract_directions, top_singular
from grasp_trl.lora import factors_from_peft_model
from grasp_trl.modules import UnsupportedModulesError, classify_all
from testing_utils import SEVEN_MODULES, lora_model, randomise_lora_b

WRITERS = ("o_proj", "down_proj")


def plant(model, direction, strength=3.0, noise=0.3, seed=0):
    """Make every writer's update `s*B@A` = strength * u v^T + rank-(r-1) random task part."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                continue
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            scale = module.scaling["default"]
            lora_a.copy_(torch.randn(lora_a.shape, generator=generator) / lora_a.shape[1] ** 0.5)
            lora_b.copy_(torch.randn(lora_b.shape, generator=generator) * noise / lora_b.shape[0] ** 0.5 / scale)
            if name.endswith(WRITERS):
                lora_a[0] = lora_a[0] / lora_a[0].norm()
                lora_b[:, 0] = direction * strength / scale


def dense_update(model, name):
    module = model.get_submodule(name)
    return module.get_delta_weight("default").double()


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_planted_direction_is_recovered(tmp_path, architecture, scope):
    model = lora_model(architecture, r=8, hidden_size=64, num_layers=4)
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(7)), dim=0)
    plant(model, u)
    from_memory = extract_directions(model, k=1, scope=scope)
    model.save_pretrained(tmp_path / "adapter")
    from_disk = extract_directions(tmp_path / "adapter", k=1, scope=scope, num_layers=4)
    for directions in (from_memory, from_disk):
        assert sorted(directions.bases) == [0, 1, 2, 3]
        for layer, basis in directions.bases.items():
            cosine = float((basis[:, 0] @ u).abs())
            assert cosine >= 0.99, (scope, layer, cosine)
    for layer in range(4):  # same subspace from disk and memory (signs are fixed deterministically)
        assert torch.allclose(from_memory.bases[layer], from_disk.bases[layer], atol=1e-5)
    assert from_disk.metadata["source_adapter_sha256"]


@pytest.mark.parametrize("include_readers", [False, True])
def test_low_rank_svd_equals_dense_svd(tmp_path, include_readers):
    """rsLoRA + rank_pattern + alpha_pattern: the factors' scaling and spectrum match PEFT's own dense dW."""
    model = lora_model(
        r=6, hidden_size=48, num_layers=2, use_rslora=True, rank_pattern={"down_proj": 3}, alpha_pattern={"o_proj": 17}
    )
    randomise_lora_b(model, seed=3, scale=0.5)
    model.save_pretrained(tmp_path / "adapter")
    for source in (model, tmp_path / "adapter"):
        directions = extract_directions(source, k=4, include_readers=include_readers, num_layers=2)
        for layer in range(2):
            blocks = []
            for leaf in SEVEN_MODULES:
                block = "mlp" if leaf in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                name = f"base_model.model.model.layers.{layer}.{block}.{leaf}"
                delta = dense_update(model, name)
                if leaf in WRITERS:
                    blocks.append(delta)
                elif include_readers:
                    blocks.append(delta.T)
            dense = torch.cat(blocks, dim=1)
            u_dense, s_dense, _ = torch.linalg.svd(dense, full_matrices=False)
            s_low = torch.tensor(directions.metadata["singular_values"][str(layer)], dtype=torch.float64)
            n = len(s_low)
            assert torch.allclose(s_low, s_dense[:n], rtol=1e-5, atol=1e-7)
            basis = directions.bases[layer].double()
            # same subspace: projector difference
            p_low, p_dense = basis @ basis.T, u_dense[:, :4] @ u_dense[:, :4].T
            assert float((p_low - p_dense).detach().norm()) < 1e-5


def test_randomised_path_matches_exact():
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(200, 3, generator=generator, dtype=torch.float64))[0]
    core = u @ torch.diag(torch.tensor([50.0, 30.0, 20.0], dtype=torch.float64)) @ torch.randn(
        3, 5000, generator=generator, dtype=torch.float64
    ) / 70 + 0.01 * torch.randn(200, 5000, generator=generator, dtype=torch.float64)
    exact_u, exact_s, _ = torch.linalg.svd(core, full_matrices=False)
    approx_u, approx_s = top_singular(core, 3)  # 5000 columns > EXACT_SVD_MAX_COLUMNS: randomised
    assert torch.allclose(approx_s, exact_s[:3], rtol=1e-6)
    assert float((approx_u @ approx_u.T - exact_u[:, :3] @ exact_u[:, :3].T).norm()) < 1e-6


def test_energy_selection_and_spectrum_metadata():
    model = lora_model(r=8, hidden_size=64, num_layers=2)
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(1)), dim=0)
    plant(model, u, strength=10.0, noise=0.05)
    directions = extract_directions(model, energy=0.9, max_k=5)
    for layer in range(2):
        assert directions.k(layer) == 1
        assert directions.metadata["energy_captured"][str(layer)] >= 0.9
    loose = extract_directions(model, energy=1.0, max_k=5)  # all 16 columns needed: capped
    assert all(loose.k(layer) == 5 for layer in range(2))


ARCHITECTURES = {
    "llama": SEVEN_MODULES,
    "qwen2": SEVEN_MODULES,
    "qwen3": SEVEN_MODULES,
    "mistral": SEVEN_MODULES,
    "gemma": SEVEN_MODULES,
    "gemma2": SEVEN_MODULES,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_module_naming_per_architecture(tmp_path, architecture):
    extra = {"fan_in_fan_out": True} if architecture == "gpt2" else {}
    model = lora_model(architecture, r=2, target_modules=ARCHITECTURES[architecture], num_layers=2, **extra)
    randomise_lora_b(model)
    factors = factors_from_peft_model(model, include_readers=True)
    roles = {(f.layer, f.role) for f in factors}
    assert roles == {(0, "write"), (0, "read"), (1, "write"), (1, "read")}
    # every LoRA factor reproduces PEFT's own dense update on the residual side
    for factor in factors:
        delta = model.get_submodule(factor.name).get_delta_weight("default").double()
        if architecture == "gpt2":  # Conv1D stores (in, out)
            delta = delta.T
        expected = delta if factor.role == "write" else delta.T
        assert torch.allclose(factor.left @ factor.right, expected, atol=1e-6), factor.name
    model.save_pretrained(tmp_path / "adapter")
    directions = extract_directions(tmp_path / "adapter", k=1, num_layers=2)
    assert sorted(directions.bases) == [0, 1]


def test_unknown_architecture_needs_classification():
    names = ["model.layers.0.mixer.in_x", "model.layers.0.mixer.out_x"]
    with pytest.raises(UnsupportedModulesError, match=r"mixer.in_x.*mixer.out_x|mixer.out_x.*mixer.in_x"):
        classify_all(names)
    found = classify_all(names, {"in_x": "read", "out_x": "write"})
    assert [(m.layer, m.role) for m in found] == [(0, "read"), (0, "write")]
    with pytest.raises(ValueError, match="expected 'write' or 'read'"):
        classify_all(names, {"in_x": "reed"})


def test_adapter_without_writers_is_rejected():
    model = lora_model(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="no LoRA module on the residual stream"):
        extract_directions(model)


def test_bad_adapter_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        extract_directions(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        extract_directions(tmp_path / "empty")
    model = lora_model()
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        extract_directions(tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="IA3"):
        extract_directions(tmp_path / "adapter")
