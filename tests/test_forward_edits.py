"""The two forward-edit modes as properties on random LoRA and full models, directions and data (DESIGN §1).

`ablate`: during a training forward each hooked block output is `h - (h U) U^T`. Checked in fp32: the component
along U is zero to 1e-6 of |h| (the scale fp32 rounding of the edit works at), block 0's orthogonal complement
is the unedited output's, and the loss equals that of an independent by-hand edit (CAFT-style hooks).
Both `ablate` and `clamp` (whose own properties are in `test_clamp.py`): a loss that depends on the model only
through `h U` moves no parameter (LoRA; full fine-tuning for ablate; with and without gradient checkpointing),
eval and no-grad forwards are untouched, and a no-grad forward between a training forward and its backward
(DPO's reference pass) leaves the gradient alone under reentrant checkpointing. A bypass run shows each check
can fail.
"""

import pytest
import torch

from grasp_trl.directions import DirectionSet
from grasp_trl.modules import block_output_hooks
from grasp_trl.projection import GradientProjector
from testing_utils import block_outputs, training_model

TOL = 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_component_along_u_is_removed_and_the_rest_kept(seed, checkpointing, tiny_batch):
    model = training_model("lora", checkpointing, seed)
    directions = DirectionSet.random(32, 3, k=2, seed=10 + seed)
    unedited = {l: h.detach() for l, h in block_outputs(model, tiny_batch["input_ids"]).items()}
    projector = GradientProjector(model, directions, "ablate").attach()
    ablated = block_outputs(model, tiny_batch["input_ids"])
    for layer, basis in directions.bases.items():
        assert (ablated[layer] @ basis).norm() <= TOL * ablated[layer].norm(), layer
    basis = directions.bases[0]  # block 0 reads the embedding: its complement is its own unedited output's
    rest = unedited[0] - (unedited[0] @ basis) @ basis.T
    assert (ablated[0] - rest).norm() <= 1e-5 * rest.norm()
    projector.detach()
    bypass = block_outputs(model, tiny_batch["input_ids"])
    assert all((bypass[l] @ b).norm() > 1e-3 * bypass[l].norm() for l, b in directions.bases.items())


EDIT_CASES = [(m, "lora", c) for m in ("ablate", "clamp") for c in (None, "reentrant", "non_reentrant")]


@pytest.mark.parametrize("mode,kind,checkpointing", EDIT_CASES + [("ablate", "full", None)])
def test_loss_through_u_moves_no_parameter(mode, kind, checkpointing, tiny_batch):
    model = training_model(kind, checkpointing)
    directions = DirectionSet.random(32, 3, k=2, seed=3)
    for layer, basis in directions.bases.items():

        def gradient_norm():
            model.zero_grad(set_to_none=True)
            readout = block_outputs(model, tiny_batch["input_ids"])[layer] @ basis
            (readout.pow(2) + readout).sum().backward()
            grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
            return sum(float(g.norm()) ** 2 for g in grads) ** 0.5

        unedited = gradient_norm()
        assert unedited > 1e-3  # bypass: without the projector the loss does move parameters
        projector = GradientProjector(model, directions, mode).attach()
        assert gradient_norm() <= TOL * unedited, layer
        projector.detach()


def test_training_loss_matches_a_by_hand_edit(tiny_batch):
    model = training_model("lora")
    directions = DirectionSet.random(32, 3, k=1, seed=5)

    def by_hand(layer, hidden):
        basis = directions.bases[layer]
        return hidden - (hidden @ basis) @ basis.T

    with block_output_hooks(model, by_hand):
        expected = float(model(**tiny_batch).loss)
    unedited = float(model(**tiny_batch).loss)
    assert abs(unedited - expected) > 1e-4 * abs(expected)  # the edit changes the loss: the check can fail
    with GradientProjector(model, directions, "ablate"):
        assert abs(float(model(**tiny_batch).loss) - expected) <= 1e-6 * abs(expected)


@pytest.mark.parametrize("mode,kind", [("ablate", "lora"), ("ablate", "full"), ("clamp", "lora")])
def test_eval_and_no_grad_forwards_are_untouched(mode, kind, tiny_batch):
    model = training_model(kind)
    directions = DirectionSet.random(32, 3, k=2, seed=4)
    model.eval()
    expected = model(**tiny_batch).logits.detach()
    with GradientProjector(model, directions, mode):
        assert torch.equal(model(**tiny_batch).logits.detach(), expected)
        model.train()
        with torch.no_grad():  # e.g. DPO's reference pass, or generation inside training
            assert torch.equal(model(**tiny_batch).logits, expected)
        assert not torch.equal(model(**tiny_batch).logits.detach(), expected)  # training forward: edited


def _old_rule(projector):
    """The first implementation's behaviour, for the bypass: a block is edited only under grad, and (clamp) any
    forward that is not a training one clears the base reference."""
    enter = projector._enter_forward

    def clearing_enter(model, args, kwargs):
        enter(model, args, kwargs)
        if not projector._training_forward:
            projector._reference = {}

    projector._edits = lambda module: module.training and torch.is_grad_enabled()
    for index, handle in enumerate(projector._handles):  # re-register the model pre-hook with the old behaviour
        if getattr(handle, "id", None) in projector.model._forward_pre_hooks:
            handle.remove()
            projector._handles[index] = projector.model.register_forward_pre_hook(clearing_enter, with_kwargs=True)


@pytest.mark.parametrize("mode", ["ablate", "clamp"])
@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_a_no_grad_forward_before_backward_leaves_the_gradient_alone(mode, checkpointing, tiny_batch):
    """DPO's order under gradient checkpointing: policy forward, reference forward (train mode, no grad), then
    backward, whose recomputation must edit the blocks as the policy forward did. The gradient must equal the
    one of the same step without checkpointing and without the reference forward, to 1e-6 relative. Bypasses:
    the step without the edit, and the first implementation's rule where it was wrong."""
    directions = DirectionSet.random(32, 3, k=2, seed=6)

    def gradient(checkpointing, reference_pass, old=False, rule=None):
        model = training_model("lora", checkpointing)
        projector = GradientProjector(model, directions, mode).attach()
        if old:
            _old_rule(projector)
        if rule is not None:
            projector._edits = rule
        loss = model(**tiny_batch).loss
        if reference_pass:
            with torch.no_grad():
                model(**tiny_batch)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    expected = gradient(None, reference_pass=False)
    assert (gradient(checkpointing, reference_pass=True) - expected).norm() <= TOL * expected.norm()

    def wrong(**bypass):
        try:
            return (gradient(checkpointing, reference_pass=True, **bypass) - expected).norm() > 1e-3 * expected.norm()
        except torch.utils.checkpoint.CheckpointError:  # the recomputation differed from the forward
            return True

    assert wrong(rule=lambda module: False)  # bypass: a step without the edit fails the check
    # the first implementation's rule, replayed, fails it where the blocks' first forward runs with grad off
    # (torch's reentrant checkpointing; transformers 5.24 no longer checkpoints this tiny Llama that way, and
    # there the old rule was right). Under non-reentrant checkpointing with transformers 5.16 the old clamp also
    # failed (CheckpointError in DPO, tests/test_trainer.py); not asserted here, as it depends on the versions.
    if first_block_forward_without_grad(checkpointing, tiny_batch):
        assert wrong(old=True)


def first_block_forward_without_grad(checkpointing, batch) -> bool:
    """Whether a training forward of the tiny LoRA model runs its blocks with grad disabled."""
    model, modes = training_model("lora", checkpointing), []
    with block_output_hooks(model, lambda layer, hidden: modes.append(torch.is_grad_enabled())):
        model(**batch)
    return not all(modes)
