"""`grasp_trl.lora`: the residual side of a LoRA update, the module walk and saved-adapter reading, checked
against PEFT's own dense `get_delta_weight` on random adapters."""

import pytest
import torch

from grasp_trl.lora import (
    active_adapter,
    basis_layer,
    constrained_factor,
    factors_from_adapter_dir,
    factors_from_peft_model,
    lora_modules,
    residual_lora_modules,
)
from grasp_trl.modules import classify
from grasp_trl.tiny import SEVEN_MODULES

TOL = 1e-6  # PEFT forms dW in the weights' fp32; ours is float64: fp32 rounding of O(1) entries (measured 4e-8)


@pytest.fixture
def adapter():
    from testing_utils import lora_model, randomise_lora_b

    model = lora_model("llama", r=3, target_modules=SEVEN_MODULES, num_layers=2, seed=1)
    randomise_lora_b(model, seed=2, scale=0.5)
    return model


def dense_updates(model) -> dict[str, torch.Tensor]:
    """PEFT's own `dW` of every LoRA module (scaling included; formed in fp32), as float64."""
    adapter = active_adapter(model)
    return {name: module.get_delta_weight(adapter).double() for name, module, _ in lora_modules(model)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_residual_side_is_dw_for_writers_and_its_transpose_for_readers(adapter, seed):
    torch.manual_seed(seed)
    for module in adapter.modules():  # fresh random A and B each seed
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            torch.nn.init.normal_(module.lora_A["default"].weight)
            torch.nn.init.normal_(module.lora_B["default"].weight)
    dense = dense_updates(adapter)
    factors = factors_from_peft_model(adapter, include_readers=True)
    assert {f.name for f in factors} == set(dense) and len(factors) == 14
    for factor in factors:
        expected = dense[factor.name] if factor.role == "write" else dense[factor.name].T
        error = (factor.left @ factor.right - expected).norm() / expected.norm()
        assert error <= TOL, (factor.name, float(error))
        compressed = factor.compressed()  # same Gram on the residual side, r x r right factor
        gram = compressed.left @ compressed.right @ (compressed.left @ compressed.right).T
        assert compressed.right.shape == (3, 3)
        assert (gram - expected @ expected.T).norm() <= TOL * (expected @ expected.T).norm()


def test_saved_adapter_reads_the_same_factors_as_the_model(adapter, tmp_path):
    adapter.save_pretrained(tmp_path)
    in_memory = {
        f.name.removeprefix("base_model.model."): f for f in factors_from_peft_model(adapter, include_readers=True)
    }
    saved, config = factors_from_adapter_dir(tmp_path, include_readers=True)
    assert config["r"] == 3 and len(saved) == len(in_memory)
    for factor in saved:
        twin = in_memory[factor.name.removeprefix("base_model.model.")]
        product, expected = factor.left @ factor.right, twin.left @ twin.right
        assert (product - expected).norm() <= 1e-6 * expected.norm()  # saved in fp32


def test_module_walk_and_the_constrained_factor(adapter):
    writers = residual_lora_modules(adapter)
    everything = residual_lora_modules(adapter, include_readers=True)
    assert len(writers) == 4 and len(everything) == 14  # o_proj + down_proj per block; all seven
    assert all(role == "write" and classify(name) == "write" for name, _, _, _, role in writers)
    assert constrained_factor("write") == ("lora_B", 0) and constrained_factor("read") == ("lora_A", 1)
    assert basis_layer("write", 3, "input") == 3 and basis_layer("read", 3, "input") == 2
    assert basis_layer("read", 3, "own") == 3
