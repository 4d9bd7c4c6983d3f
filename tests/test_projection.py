"""Stage 2 invariants, as properties on random models, directions and data (DESIGN §1).

Tolerances: fp32 throughout; "exactly zero" is checked as <= 1e-6 of the unprojected magnitude, which is
what fp32 rounding of `g - (g U) U^T` allows.
"""

import pytest
import torch

from grasp_trl.compat import enable_checkpointing
from grasp_trl.directions import DirectionSet
from grasp_trl.modules import decoder_blocks
from grasp_trl.projection import GradientProjector
from grasp_trl.tiny import build_model
from testing_utils import SEVEN_MODULES, block_of, lora_leakage, lora_model, randomise_lora_b, residual_role

TOL = 1e-6


def capture_outputs(model):
    """Forward hooks (registered *after* the projector's) that keep each block's output and the gradient
    that leaves it (i.e. after the projector's tensor hook has run)."""
    outputs, grads, handles = {}, {}, []
    for layer, block in enumerate(decoder_blocks(model)):

        def hook(module, args, output, layer=layer):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[layer] = hidden
            if hidden.requires_grad:
                hidden.register_hook(lambda g, layer=layer: grads.__setitem__(layer, g.detach().clone()))

        handles.append(block.register_forward_hook(hook))
    return outputs, grads, handles


def trainable_grad_norm(model):
    return sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.requires_grad and p.grad is not None) ** 0.5


def make_model(kind):
    if kind == "lora":
        model = lora_model(r=4, num_layers=3)
        randomise_lora_b(model)
        return model
    return build_model("llama", vocab_size=100, hidden_size=32, num_layers=3, seed=0)  # full fine-tuning


def loss_through_projection(model, outputs, directions, layer, batch):
    model(input_ids=batch["input_ids"])
    readout = outputs[layer] @ directions.bases[layer]
    return (readout.pow(2) + readout).sum()


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_activation_projection_zeroes_gradients_of_a_loss_along_u(kind, checkpointing, tiny_batch):
    model = make_model(kind)
    if checkpointing:
        enable_checkpointing(model, use_reentrant=checkpointing == "reentrant")
        if kind == "lora":
            model.enable_input_require_grads()
    model.train()
    directions = DirectionSet.random(32, 3, k=2, seed=1)
    for layer in range(3):
        # without projection the loss moves the parameters
        outputs, _, handles = capture_outputs(model)
        model.zero_grad(set_to_none=True)
        loss_through_projection(model, outputs, directions, layer, tiny_batch).backward()
        unprojected = trainable_grad_norm(model)
        assert unprojected > 1e-3
        for handle in handles:
            handle.remove()
        # with projection every trainable parameter's gradient vanishes
        projector = GradientProjector(model, directions, "activations").attach()
        outputs, _, handles = capture_outputs(model)
        model.zero_grad(set_to_none=True)
        loss_through_projection(model, outputs, directions, layer, tiny_batch).backward()
        assert trainable_grad_norm(model) <= TOL * unprojected, (layer, trainable_grad_norm(model), unprojected)
        projector.detach()
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_gradient_leaving_each_residual_has_no_component_along_u(checkpointing, tiny_batch):
    model = make_model("lora")
    if checkpointing:
        enable_checkpointing(model, use_reentrant=checkpointing == "reentrant")
        model.enable_input_require_grads()
    model.train()
    directions = DirectionSet.random(32, 3, k=2, seed=2)
    projector = GradientProjector(model, directions, "activations").attach()
    _, grads, _ = capture_outputs(model)
    model(**tiny_batch).loss.backward()
    assert sorted(grads) == [0, 1, 2]
    for layer, grad in grads.items():
        along = (grad @ directions.bases[layer]).norm()
        assert along <= TOL * grad.norm(), (layer, float(along / grad.norm()))
    assert 0 < projector.pop_grad_removed_fractions()["residual"] < 1
    projector.detach()
    _, grads, _ = capture_outputs(model)
    model.zero_grad()
    model(**tiny_batch).loss.backward()
    assert all((g @ directions.bases[l]).norm() > 1e-3 * g.norm() for l, g in grads.items())


def hand_projected_factors(model, directions):
    """Per constrained LoRA factor (parameter name -> float64 tensor), the closest factor satisfying the
    invariant, by hand from the model's current weights: readers' `A (I - U U^T)` (A's columns live in the
    residual stream), writers' `(I - U U^T) B` (B's rows do)."""
    result = {}
    for name, param in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        module = name.split(".lora_")[0]
        role, layer = residual_role(module), block_of(module)
        basis = directions.bases[layer].double()
        eye = torch.eye(basis.shape[0], dtype=torch.float64)
        if role == "read" and ".lora_A." in name:
            result[name] = param.detach().double() @ (eye - basis @ basis.T)
        elif role == "write" and ".lora_B." in name:
            result[name] = (eye - basis @ basis.T) @ param.detach().double()
    return result


@pytest.mark.parametrize("projection", ["activations", "weights", "both"])
def test_forward_pass_is_bit_identical(projection, tiny_batch):
    """Activation hooks never touch the forward: with the same weights the hooked model's forward equals a plain
    one bit for bit. The weight mode's initial projection does change the adapter: every constrained factor
    must become the float64 projection computed by hand (`hand_projected_factors`, from the unprojected weights),
    to fp32 rounding; the plain model then gets the hooked model's weights copied in, with no projector of its
    own, so the expected forward never comes from the projector under test."""
    plain = make_model("lora")
    hooked = make_model("lora")
    directions = DirectionSet.random(32, 3, k=2)
    wanted = hand_projected_factors(plain, directions)
    assert len(wanted) == 21
    before = {n: p.detach().clone() for n, p in hooked.named_parameters()}
    GradientProjector(hooked, directions, projection).attach()
    weights = dict(hooked.named_parameters())
    if projection == "activations":
        assert all(torch.equal(weights[n], p) for n, p in before.items())
    else:
        for name, factor in wanted.items():
            error = float((weights[name].detach().double() - factor).norm() / factor.norm())
            moved = float((before[name].double() - factor).norm() / factor.norm())
            assert error <= TOL < moved, (name, error, moved)
        assert all(torch.equal(weights[n], p) for n, p in before.items() if n not in wanted)
    with torch.no_grad():
        for name, param in plain.named_parameters():
            param.copy_(weights[name])
    expected = plain(**tiny_batch)
    got = hooked(**tiny_batch)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.loss, expected.loss)


def train(model, projector, steps, batch, lr=1e-2, post_step=True):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(4, 100, batch["input_ids"].shape, generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        projector.project_gradients()  # no-op unless the projector was built with grad_hooks=False
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if post_step:
            projector.project_parameters()


@pytest.mark.parametrize("reader_layer,grad_hooks", [("own", True), ("input", True), ("own", False)])
def test_weight_projection_keeps_lora_update_orthogonal(reader_layer, grad_hooks, tiny_batch):
    model = lora_model(r=4, num_layers=3, target_modules=SEVEN_MODULES)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    directions = DirectionSet.random(32, 3, k=2, seed=3)
    projector = GradientProjector(
        model, directions, "weights", sides="both", reader_layer=reader_layer, grad_hooks=grad_hooks
    ).attach()
    assert len(projector.constraints) == (21 if reader_layer == "own" else 21 - 5)
    train(model, projector, 50, tiny_batch)
    if reader_layer == "own":
        assert max(lora_leakage(model, directions).values()) <= TOL
    assert projector.leakage() <= TOL
    for name, param in model.named_parameters():  # the frozen base never moves
        if name in base:
            assert torch.equal(param, base[name]), name


def test_gradient_projection_alone_leaks_under_adam(tiny_batch):
    """Why the post-step projection exists: Adam's per-coordinate scaling re-introduces a component along U."""
    model = lora_model(r=4, num_layers=3)
    directions = DirectionSet.random(32, 3, k=2, seed=3)
    projector = GradientProjector(model, directions, "weights", sides="both").attach()
    train(model, projector, 50, tiny_batch, post_step=False)
    assert max(lora_leakage(model, directions).values()) > 1e-3


@pytest.mark.parametrize("grad_hooks", [True, False])
def test_full_finetuning_keeps_pretrained_component(grad_hooks, tiny_batch):
    model = build_model("llama", vocab_size=100, hidden_size=32, num_layers=3, seed=0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    directions = DirectionSet.random(32, 3, k=2, seed=4)
    projector = GradientProjector(model, directions, "weights", sides="both", grad_hooks=grad_hooks).attach()
    train(model, projector, 30, tiny_batch, lr=3e-3)
    checked = 0
    for name, param in model.named_parameters():
        delta = param.detach() - initial[name]
        if delta.norm() == 0:
            continue
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            layer = int(name.split(".layers.")[1].split(".")[0])
            along, before, after = (
                directions.bases[layer].T @ delta,
                directions.bases[layer].T @ initial[name],
                directions.bases[layer].T @ param.detach(),
            )
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            layer = int(name.split(".layers.")[1].split(".")[0])
            along, before, after = (
                delta @ directions.bases[layer],
                initial[name] @ directions.bases[layer],
                param.detach() @ directions.bases[layer],
            )
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            layer = 0 if "embed" in name else 2
            along, before, after = (
                delta @ directions.bases[layer],
                initial[name] @ directions.bases[layer],
                param.detach() @ directions.bases[layer],
            )
        else:
            continue  # norms are not on the residual stream's linear path
        checked += 1
        assert along.norm() <= TOL * delta.norm() + 1e-7 * before.norm(), name
        assert torch.allclose(after, before, atol=1e-6), name
    assert checked == 3 * 7 + 2
    assert projector.leakage() <= 1e-6


def random_grads(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=generator) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("max_stack_numel", [None, 0, 1 << 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_projection_equals_per_parameter_projection(kind, max_stack_numel, dtype):
    """`project_gradients` (stacks of same-shaped factors, or single tensors in place) gives the per-parameter
    hooks' gradients, and the grouped `project_parameters` gives `project_constraint`, on random tensors."""
    from grasp_trl.constraints import group_constraints
    from grasp_trl.projection import project_constraint

    model = make_model(kind).to(dtype)
    directions = DirectionSet.random(32, 3, k=2, seed=5)
    grads = random_grads(model, seed=6)
    hooked = GradientProjector(model, directions, "weights", grad_hooks=True).attach()
    expected = {}
    for name, param in model.named_parameters():
        if param.requires_grad:  # the hooks run when a gradient flows into the parameter
            expected[name] = torch.autograd.grad((param * grads[name].to(dtype)).sum(), param)[0]
    hooked.detach()
    batched = GradientProjector(model, directions, "weights", grad_hooks=False).attach()
    batched.groups = group_constraints(batched.constraints, max_stack_numel)
    assert any(len(g.constraints) > 1 for g in batched.groups) == (kind == "lora" and max_stack_numel != 0)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.grad = grads[name].to(dtype)
    batched.project_gradients()
    tol = TOL if dtype == torch.float32 else 1e-2
    constrained = {c.param for c in batched.constraints}
    for name, param in model.named_parameters():
        if param in constrained:
            error = (param.grad.float() - expected[name].float()).norm() / expected[name].float().norm()
            assert error <= tol, (name, float(error))
    for param in constrained:  # move every constrained weight off its constraint, then restore
        param.data.add_(torch.randn_like(param, dtype=torch.float32).to(dtype), alpha=0.1)
    wanted = {c.name: project_constraint(c, c.param.data).float() for c in batched.constraints}
    batched.project_parameters()
    for constraint in batched.constraints:
        error = (constraint.param.float() - wanted[constraint.name]).norm() / wanted[constraint.name].norm()
        assert error <= tol, (constraint.name, float(error))
    assert batched.leakage() <= (TOL if dtype == torch.float32 else 2e-3)  # bf16: rounding of the stored weight


def test_dora_is_rejected_in_weights_mode():
    model = lora_model(use_dora=True)
    directions = DirectionSet.random(32, 3, k=1)
    with pytest.raises(ValueError, match="DoRA"):
        GradientProjector(model, directions, "weights").attach()
    GradientProjector(model, directions, "activations").attach()  # fine: hooks act on activations


def test_bad_arguments_and_mismatched_directions():
    model = lora_model()
    with pytest.raises(ValueError, match="sides: expected one of"):
        GradientProjector(model, DirectionSet.random(32, 3, 1), sides="wrte")
    with pytest.raises(ValueError, match="projection: expected one of"):
        GradientProjector(model, DirectionSet.random(32, 3, 1), projection="activation")
    with pytest.raises(ValueError, match="hidden_size=16.*hidden_size=32"):
        GradientProjector(model, DirectionSet.random(16, 3, 1))
    with pytest.raises(ValueError, match="num_layers=4.*num_hidden_layers=3"):
        GradientProjector(model, DirectionSet.random(32, 4, 1))


def test_timing_hook_counts_only_while_on(tiny_batch):
    """`projector.timing` (the overhead benchmark's seam): off, nothing is counted; on, every per-step entry point
    (block-output hooks, the batched gradient projection, the post-step projection) adds its time."""
    model = lora_model(r=4, num_layers=3)
    randomise_lora_b(model)
    projector = GradientProjector(model, DirectionSet.random(32, 3, k=2, seed=2), "both", grad_hooks=False).attach()
    model(**tiny_batch).loss.backward()
    projector.project_gradients()
    projector.project_parameters()
    assert projector.seconds == 0.0
    projector.timing = True
    model(**tiny_batch).loss.backward()
    after_backward = projector.seconds
    projector.project_gradients()
    after_gradients = projector.seconds
    projector.project_parameters()
    assert 0 < after_backward < after_gradients < projector.seconds
