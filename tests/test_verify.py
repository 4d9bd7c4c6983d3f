"""`grasp_trl.verify.saved_adapter_leakage` against the tests' own oracle (`testing_utils`): the same per-module
leakage of a saved adapter, computed from PEFT's dense `get_delta_weight` (in memory) and from `scaling * B @ A`
read with safetensors (saved), in float64."""

import pytest

from grasp_trl.directions import DirectionSet
from grasp_trl.projection import GradientProjector
from grasp_trl.verify import saved_adapter_leakage
from testing_utils import lora_leakage, lora_model, randomise_lora_b, saved_lora_leakage


@pytest.mark.parametrize("layers", [None, [1]])
def test_saved_adapter_leakage_equals_the_dense_oracle(layers, tmp_path):
    """A random adapter (B randomised, so the leakage is far from zero) and the same adapter after the weight
    projection (leakage ~1e-8): every module in a block with a basis, with the oracle's value."""
    directions = DirectionSet.random(32, 3, 2, seed=7, layers=layers)
    for projected in (False, True):
        model = lora_model(r=4, num_layers=3)
        randomise_lora_b(model, seed=3)
        if projected:
            GradientProjector(model, directions, "weights").attach().detach()
        model.save_pretrained(tmp_path / str(projected))
        found = saved_adapter_leakage(tmp_path / str(projected), directions)
        saved = saved_lora_leakage(tmp_path / str(projected), directions)
        dense = lora_leakage(model, directions)
        assert sorted(found) == sorted(saved) == sorted(dense) and len(found) == 7 * len(directions.bases)
        for name, value in found.items():
            assert value == pytest.approx(saved[name], rel=1e-9, abs=1e-12), name
            assert value == pytest.approx(dense[name], rel=1e-5, abs=1e-7), name
        assert (max(found.values()) <= 1e-6) == projected, found
