"""`clamp` mode as properties on random LoRA models, directions and data (DESIGN §1).

During a training forward each hooked block output is `h - (h U) U^T + (h_base U) U^T`, with `h_base` the
adapter-disabled output on the same batch. Checked in fp32, to 1e-6 of the magnitudes involved: the component
along U equals the base's and the orthogonal complement equals the unclamped output's, with and without
gradient checkpointing; the loss equals an independent by-hand edit's; full fine-tuning is refused. (The
along-U check is relative to |h|: that is the scale fp32 rounding of the clamp works at.) What clamp shares
with `ablate` (a loss through `h U` moves no parameter, eval and no-grad forwards untouched, a no-grad forward
before backward leaves the gradient alone) is in `test_forward_edits.py`. A bypass run (projector detached)
shows each check can fail.
"""

import pytest
import torch

from grasp_trl.directions import DirectionSet
from grasp_trl.projection import GradientProjector
from grasp_trl.tiny import build_model
from testing_utils import block_outputs, training_model

TOL = 1e-6


def base_outputs(model, batch):
    with torch.no_grad(), model.disable_adapter():
        return {l: h.detach() for l, h in block_outputs(model, batch["input_ids"]).items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_component_along_u_is_the_base_one_and_the_rest_is_the_adapters(seed, checkpointing, tiny_batch):
    model = training_model("lora", checkpointing, seed)
    directions = DirectionSet.random(32, 3, k=2, seed=10 + seed)
    reference = base_outputs(model, tiny_batch)
    unclamped = {l: h.detach() for l, h in block_outputs(model, tiny_batch["input_ids"]).items()}
    projector = GradientProjector(model, directions, "clamp").attach()
    clamped = block_outputs(model, tiny_batch["input_ids"])
    for layer, basis in directions.bases.items():
        along, along_base = clamped[layer] @ basis, reference[layer] @ basis
        # fp32 rounding of `h - (h U - c) U^T` is relative to |h|, not to the (smaller) |h U|
        assert (along - along_base).norm() <= TOL * clamped[layer].norm(), layer
        rest = clamped[layer] - along @ basis.T
        rest_unclamped = unclamped[layer] - (unclamped[layer] @ basis) @ basis.T
        if layer == 0:  # block 0's input is the embedding: its unclamped part is the adapter's own output
            assert (rest - rest_unclamped).norm() <= 1e-5 * rest_unclamped.norm()
    projector.detach()
    bypass = block_outputs(model, tiny_batch["input_ids"])
    assert all(
        ((bypass[l] - reference[l]) @ b).norm() > 1e-3 * (reference[l] @ b).norm() for l, b in directions.bases.items()
    )  # the adapter does move h along U: the check can fail


def test_training_loss_matches_the_formula(tiny_batch):
    """End to end: the clamped model's loss equals the loss of a model whose block outputs are edited by hand
    with the same formula (an independent implementation, as CAFT-style forward hooks)."""
    from grasp_trl.modules import block_output_hooks

    model = training_model("lora")
    directions = DirectionSet.random(32, 3, k=1, seed=5)
    reference = {l: h @ directions.bases[l] for l, h in base_outputs(model, tiny_batch).items()}

    def by_hand(layer, hidden):
        basis = directions.bases[layer]
        return hidden - (hidden @ basis) @ basis.T + reference[layer] @ basis.T

    with block_output_hooks(model, by_hand):
        expected = float(model(**tiny_batch).loss)
    with GradientProjector(model, directions, "clamp"):
        assert abs(float(model(**tiny_batch).loss) - expected) <= 1e-6 * abs(expected)


def test_full_finetuning_is_refused_with_the_alternative():
    model = build_model("llama", vocab_size=100, hidden_size=32, num_layers=3, seed=0)
    with pytest.raises(ValueError, match=r"clamp.*PEFT.*found a plain LlamaForCausalLM.*'activations' or 'both'"):
        GradientProjector(model, DirectionSet.random(32, 3, k=1), "clamp").attach()
