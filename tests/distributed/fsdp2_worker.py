"""GRASP under FSDP2 (`torch.distributed.fsdp.fully_shard`): several runs in one launch, each checked on every rank.

Launched by tests/test_fsdp2.py (start-up dominates the tiny runs):

    torchrun --nproc_per_node 2 tests/distributed/fsdp2_worker.py SPEC.json

Why not through the HF Trainer: on a CPU-only machine accelerate never selects FSDP (docs/SUPPORT.md, "FSDP2");
so each run is the loop a Trainer with FSDP2 runs, written out: a tiny model (PEFT LoRA, or full fine-tuning),
the projector attached *before* `fully_shard` (the trainers' order: it must follow the parameters FSDP2
replaces), `fully_shard` on every decoder block and on the root, then per step forward/backward on this rank's
half of the global batch, `project_gradients()` (sharded `.grad`), gradient clipping, AdamW, and
`project_parameters()` (skipped with `bypass`).

On every rank the same run is also trained without FSDP on the whole global batch (the single-process
reference), and the worker records, per rank, in `<out_dir>/<name>/rank<R>.json`:
* `residual_leakage`: max `||g U|| / ||g||` over the gradients leaving each hooked residual (a probe hook
  registered after GRASP's), and how many it saw;
* `grad_leakage`: after `project_gradients()`, max over constrained factors of the gathered gradient's
  relative component along U (writers `||U^T G||/||G||`, readers `||G U||/||G||`);
* `leakage`: the projector's `leakage()` on the sharded model (gathers the factors);
* `distance`: max per-tensor `||W_fsdp - W_ref|| / ||W_ref - W_init||` over the trainable tensors, gathered;
* `placements`: the placements seen on the constrained parameters;
and rank 0 saves the gathered adapter (`get_model_state_dict(full_state_dict=True)`, what accelerate's
FULL_STATE_DICT uses) as a PEFT adapter directory `<out_dir>/<name>/adapter/`, or the full model's tensors.

Run keys: name, arch (qwen2/llama), projection, steps, r, lr, full (full fine-tuning), shard_dim (0: FSDP2's
default `Shard(0)`; 1: `shard_placement_fn` -> `Shard(1)`), checkpointing (HF non-reentrant gradient
checkpointing), attach_after (attach the projector after sharding instead), bypass (no post-step projection),
mp (on every `fully_shard`: "fp32", `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`;
"accelerate", param, reduce and output dtype bfloat16, accelerate's FSDP2 bf16 policy; the sharded parameters
stay fp32), offload (`CPUOffloadPolicy(pin_memory=False)`: pinning needs an accelerator),
bf16 (the model's parameters cast to bfloat16 before the projector attaches, in the reference too). With `mp`
there is no unsharded loop with FSDP2's mixed precision: `distance` is against FSDP2 with the same policies on a
mesh of this rank alone (the whole batch), `fp32_distance` against the fp32 single process. The worker also
records `policies` (each FSDP parameter's param/reduce dtype and `offload_to_cpu`, read from FSDP2's own state),
`param_dtypes` / `grad_dtypes` (the trainable shards and the constrained `.grad`) and `residual_grad_dtypes`
(the dtypes of the gradients the probe saw).
A run named "dtensor_unit" instead checks `project_dtensors_` on random DTensors of uneven shapes and several
placements against the dense formula.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from grasp_trl.directions import DirectionSet  # noqa: E402
from testing_utils import SEVEN_MODULES  # noqa: E402

HIDDEN, LAYERS, VOCAB, ROWS, SEQ = 32, 2, 100, 8, 16


def build(run: dict, directions):
    from peft import LoraConfig, get_peft_model

    from grasp_trl.tiny import build_model

    model = build_model(run.get("arch", "qwen2"), vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, seed=0)
    if not run.get("full"):
        torch.manual_seed(0)
        r = run.get("r", 3)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=SEVEN_MODULES))
    if run.get("bf16"):
        model.to(torch.bfloat16)
    if run.get("checkpointing"):
        from grasp_trl.compat import enable_checkpointing

        enable_checkpointing(model, use_reentrant=False)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    return model


def residual_probe(model, directions):
    """Max `||g U|| / ||g||` of the gradient leaving each hooked block (registered after the projector's)."""
    from grasp_trl.modules import decoder_blocks

    stats = {"max": 0.0, "count": 0, "dtypes": set()}

    def record(layer, grad):
        g = grad.float().reshape(-1, grad.shape[-1])
        ratio = float((g @ directions.bases[layer]).norm() / g.norm().clamp_min(1e-30))
        stats["max"], stats["count"] = max(stats["max"], ratio), stats["count"] + 1
        stats["dtypes"].add(str(grad.dtype))

    def on_output(layer, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden.register_hook(lambda grad: record(layer, grad))

    blocks = decoder_blocks(model)
    for layer in directions.bases:
        blocks[layer].register_forward_hook(lambda m, a, o, layer=layer: on_output(layer, m, a, o))
    return stats


_ONE_RANK_MESH = []


def one_rank_mesh():
    """A device mesh of this rank alone (the "shard" dimension of a (world x 1) mesh; built once, collectively)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not _ONE_RANK_MESH:
        mesh = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard"))
        _ONE_RANK_MESH.append(mesh["shard"])
    return _ONE_RANK_MESH[0]


def shard(model, run: dict, mesh=None):
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    from grasp_trl.modules import decoder_blocks

    kwargs = {"mesh": mesh} if mesh is not None else {}
    if run.get("shard_dim"):
        kwargs["shard_placement_fn"] = lambda param: Shard(1) if param.ndim == 2 else Shard(0)
    if run.get("mp") == "fp32":  # bf16 compute, fp32 gradient reduction
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif run.get("mp") == "accelerate":  # what accelerate builds for FSDP2 with bf16 (utils/dataclasses.py)
        bf16 = torch.bfloat16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16, output_dtype=bf16)
    if run.get("offload"):  # the default pin_memory=True needs an accelerator (torch 2.13 _fsdp_param.py:315)
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    for block in decoder_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def gathered(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor, whole, by FSDP2's own full-state-dict gather."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    return {k: v.detach().float().clone() for k, v in state.items() if k in trainable}


def policies(model) -> list[str]:
    """Each FSDP2 parameter's (param_dtype, reduce_dtype, offload_to_cpu), as FSDP2's own state holds them."""
    from torch.distributed.fsdp import FSDPModule

    seen = set()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            for p in group.fsdp_params if group is not None else ():
                seen.add(str((str(p.param_dtype), str(p.reduce_dtype), p.offload_to_cpu)))
    return sorted(seen)


def grad_leakage(projector) -> float:
    worst = 0.0
    for c in projector.constraints:
        grad = c.param.grad
        if grad is None:
            continue
        full = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).float()
        full = full.reshape(full.shape[0], -1)
        along = c.basis.T @ full if c.dim == 0 else full @ c.basis
        worst = max(worst, float(along.norm() / full.norm().clamp_min(1e-30)))
    return worst


def train(run: dict, directions, batch, *, mode: str) -> dict:
    """One run. `mode`: "sharded" (FSDP2 over all ranks, on this rank's half of the batch), "one_rank" (FSDP2,
    same policies, on a mesh of this rank alone and the whole batch), "single" (no FSDP, the whole batch)."""
    from grasp_trl.projection import GradientProjector

    distributed = mode != "single"
    model = build(run, directions)
    initial = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    projector = GradientProjector(model, directions, run["projection"], grad_hooks=False)
    if not (distributed and run.get("attach_after")):
        projector.attach()
    if distributed:
        shard(model, run, one_rank_mesh() if mode == "one_rank" else None)
        if run.get("attach_after"):
            projector.attach()
    probe = residual_probe(model, directions) if projector.uses_activations else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.get("lr", 1e-2), weight_decay=0.0)
    if mode == "sharded":
        rank, world = dist.get_rank(), dist.get_world_size()
        per = ROWS // world
        batch = batch[rank * per : (rank + 1) * per]
    worst_grad, losses, grad_dtypes = 0.0, [], set()
    for _ in range(run["steps"]):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        projector.project_gradients()
        if projector.uses_weights:
            worst_grad = max(worst_grad, grad_leakage(projector))
            grad_dtypes |= {str(c.param.grad.dtype) for c in projector.constraints if c.param.grad is not None}
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if not run.get("bypass"):
            projector.project_parameters()
        optimizer.zero_grad()
        losses.append(float(loss))
    result = {"losses": losses, "leakage": projector.leakage(), "grad_leakage": worst_grad}
    result["grad_dtypes"] = sorted(grad_dtypes)  # of the constrained parameters' `.grad` (weights mode)
    if probe is not None:
        result["residual_leakage"], result["residual_gradients_seen"] = probe["max"], probe["count"]
        result["residual_grad_dtypes"] = sorted(probe["dtypes"])
    if distributed:
        result["placements"] = sorted({str(tuple(c.param.placements)) for c in projector.constraints})
        result["constrained"] = len(projector.constraints)
        result["policies"] = policies(model)
        result["param_dtypes"] = sorted({str(p.dtype) for p in params})
        result["dtensor_grads"] = all(
            type(c.param.grad).__name__ == "DTensor" for c in projector.constraints if c.param.grad is not None
        )
    result["tensors"] = (
        gathered(model)
        if distributed
        else {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    )
    result["initial"] = initial
    result["model"] = model
    return result


def save_adapter(model, tensors: dict[str, torch.Tensor], target: Path) -> None:
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        adapter = {k.replace(".default.weight", ".weight"): v.contiguous() for k, v in tensors.items() if ".lora_" in k}
        save_file(adapter, str(target / "adapter_model.safetensors"))
        model.peft_config["default"].save_pretrained(str(target))
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(target / "model.safetensors"))


def relative_distance(found: dict, reference: dict) -> float:
    """Max per-tensor `||W - W_ref|| / ||W_ref - W_init||` over the trainable tensors."""
    distance = 0.0
    assert found["tensors"].keys() == reference["tensors"].keys()
    for key, expected in reference["tensors"].items():
        change = float((expected - reference["initial"][key]).norm())
        if change > 0:
            distance = max(distance, float((found["tensors"][key] - expected).norm()) / change)
    return distance


def one_run(run: dict, out: Path, directions, batch) -> None:
    """The sharded run against the single-process one (`distance`); with `mp`, whose single-process reference
    can only be fp32 (`fp32_distance`), `distance` is against FSDP2 with the same policies on one rank."""
    rank = dist.get_rank()
    fsdp = train(run, directions, batch, mode="sharded")
    reference = train({k: v for k, v in run.items() if k != "mp"}, directions, batch, mode="single")
    result = {k: v for k, v in fsdp.items() if k not in ("tensors", "initial", "model")}
    result.update(
        name=run["name"],
        rank=rank,
        distance=relative_distance(fsdp, reference),
        reference_leakage=reference["leakage"],
        reference_losses=reference["losses"],
    )
    if run.get("mp"):
        one_rank = train(run, directions, batch, mode="one_rank")
        result.update(
            fp32_distance=result["distance"],
            distance=relative_distance(fsdp, one_rank),
            one_rank_leakage=one_rank["leakage"],
            one_rank_policies=one_rank["policies"],
        )
    if fsdp["model"] is not None and not hasattr(fsdp["model"], "peft_config"):  # full fine-tuning
        result["full_leakage"] = full_leakage(reference["model"], directions, fsdp["tensors"], fsdp["initial"])
    target = out / run["name"]
    target.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_adapter(fsdp["model"], fsdp["tensors"], target / "adapter")
    (target / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


def full_leakage(plain_model, directions, trained, initial) -> float:
    """Max over anchored constraints of `||U^T (W - W0)|| / ||W - W0||` (or `(W - W0) U`), gathered tensors."""
    from grasp_trl.constraints import find_constraints

    constraints = find_constraints(plain_model, directions)
    worst = 0.0
    for c in constraints:
        key = c.name.split("+")[0]
        delta = trained[key] - initial[key]
        worst = max(worst, float(c.component(delta).norm() / delta.norm().clamp_min(1e-30)))
    return worst


def dtensor_unit(out: Path) -> None:
    """`project_dtensors_` vs the dense formula on random DTensors: uneven shapes, Shard(0)/Shard(1)/Replicate,
    a 2-D (replicate x shard) mesh, a 1-D bias, anchors; and the number of all-reduces it issues."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import grasp_trl.fsdp as fsdp
    from grasp_trl.projection import remove_component

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    generator = torch.Generator().manual_seed(3)
    d, k = 33, 2
    basis = torch.linalg.qr(torch.randn(d, k, generator=generator))[0]
    cases = []
    for shape, dim, placements, mesh_ in [
        ((d, 5), 0, [Shard(0)], mesh),
        ((d, 5), 0, [Shard(1)], mesh),
        ((d, 5), 0, [Replicate()], mesh),
        ((5, d), 1, [Shard(1)], mesh),
        ((5, d), 1, [Shard(0)], mesh),
        ((3, d), 1, [Shard(0)], mesh),
        ((d, 3), 0, [Shard(0)], mesh),
        ((d,), 0, [Shard(0)], mesh),
        ((d, 5), 0, [Replicate(), Shard(0)], mesh2),
        ((7, d), 1, [Replicate(), Shard(1)], mesh2),
        ((1, d), 1, [Shard(0)], mesh),
    ]:
        for anchored in (False, True):
            full = torch.randn(shape, generator=generator)
            matrix = full.reshape(shape[0], -1)
            anchor = None
            if anchored:
                anchor = torch.randn((k, matrix.shape[1]) if dim == 0 else (matrix.shape[0], k), generator=generator)
            expected = remove_component(matrix.clone(), basis, dim, anchor)[0].reshape(shape)
            cases.append(
                (
                    distribute_tensor(full.clone(), mesh_, placements),
                    dim,
                    anchor,
                    expected,
                    f"{shape} dim{dim} {placements}{' anchored' if anchored else ''}",
                )
            )
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda tensor, *a, **kw: (calls.append(tensor.numel()), original(tensor, *a, **kw))[1]
    try:
        fsdp.project_dtensors_([(x, basis, dim, anchor) for x, dim, anchor, _, _ in cases])
    finally:
        dist.all_reduce = original
    errors = {label: float((x.full_tensor() - expected).abs().max()) for x, _, _, expected, label in cases}
    local_sizes = {label: list(x.to_local().shape) for x, _, _, _, label in cases}
    result = {
        "rank": dist.get_rank(),
        "max_error": max(errors.values()),
        "errors": errors,
        "local_shapes": local_sizes,
        "all_reduce_calls": len(calls),
        "all_reduce_numel": calls,
    }
    target = out / "dtensor_unit"
    target.mkdir(parents=True, exist_ok=True)
    (target / f"rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))


def main(path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(path).read_text())
    dist.init_process_group("gloo")
    out = Path(spec["out_dir"])
    directions = DirectionSet.random(HIDDEN, LAYERS, k=2, seed=1)
    batch = torch.randint(4, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(5))
    try:
        for run in spec["runs"]:
            if run["name"] == "dtensor_unit":
                dtensor_unit(out)
            else:
                one_run(run, out, directions, batch)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
