"""`weights`-mode projection on FSDP2 (`torch.distributed.fsdp.fully_shard`) parameters, shard by shard.

FSDP2 turns every parameter into a DTensor: each rank holds one block of rows/columns (`param.to_local()`),
described by `param.placements` over `param.device_mesh` (`Shard(0)` by default, `Shard(1)` with a
`shard_placement_fn`, `(Replicate(), Shard(0))` under HSDP). Gradients after backward are DTensors of the same
placements. Nothing here gathers a whole parameter:

* residual side on dim 0 (writer LoRA `B`, full writer weights), coefficients `c = U^T x` (`k x cols`). The local
  block holds global rows `R` and columns `C`; `c[:, C] = sum over the ranks holding the other row blocks of
  U[R]^T x_local`. So each rank computes its partial `k x |C|` product, the partials are summed over the mesh
  dimensions whose placement is `Shard(0)` (one all-reduce of a `k x r` matrix per LoRA factor, all factors of
  a mesh batched into one flat buffer), and each rank updates its own rows: `x_local -= U[R] (c - anchor[:, C])`.
  Where dim 0 is not sharded (`Shard(1)`, `Replicate`) the local block has every row and no communication is
  needed.
* residual side on dim 1 (reader LoRA `A`, full reader weights), `c = x U` (`rows x k`): the same with the
  roles of rows and columns swapped; FSDP2's default `Shard(0)` of `A` needs no communication at all.

`R` and `C` come from `compute_local_shape_and_global_offset` (torch's own rule, the one FSDP2 and
`distribute_tensor` follow: `torch.chunk` sizes, so the last shards may be smaller or empty; an empty shard still
joins the all-reduce with a zero partial). Every rank must call these functions with the same tensors in the
same order (the projector's constraint list guarantees that).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .projection import FORWARD_EDITS


def is_dtensor(x) -> bool:
    """True for a DTensor (an FSDP2 parameter, or its gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without torch.distributed.tensor
        return False
    return isinstance(x, DTensor)


def local_ranges(x) -> tuple[slice, ...]:
    """The global index range of `x`'s local shard on each tensor dimension."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    return tuple(slice(o, o + s) for s, o in zip(shape, offset))


def reduction_mesh_dims(x, dim: int) -> tuple[int, ...]:
    """The mesh dimensions over which `x` is sharded on tensor dimension `dim` (where partial products of the
    residual side must be summed). Partial placements (never a parameter's) are refused."""
    dims = []
    for mesh_dim, placement in enumerate(x.placements):
        if placement.is_partial():
            raise ValueError(
                f"GRASP cannot project a DTensor with a Partial placement ({x.placements}); FSDP2 "
                "parameters and their reduced gradients are Shard/Replicate"
            )
        if placement.is_shard() and placement.dim % x.ndim == dim:
            dims.append(mesh_dim)
    return tuple(dims)


def _check_shape(x, what: str) -> None:
    if x.ndim not in (1, 2):
        raise ValueError(f"GRASP's FSDP2 projection handles 1-D and 2-D parameters; {what} has shape {tuple(x.shape)}")


@torch.no_grad()
def project_dtensors_(items, *, stats: bool = False):
    """Project DTensors in place on their local shards: `x - U (U^T x - C)` (`dim=0`) or `x - (x U - C) U^T`
    (`dim=1`), `C` the anchor (None: zero).

    `items`: `(x, basis (d, k) fp32, dim, anchor or None)`; `x` a DTensor (a parameter or its `.grad`); the
    anchor, when given, is the *global* coefficient block (`k x cols` for dim 0, `rows x k` for dim 1), sliced
    here to the local columns/rows. All partial products that need summing over the same mesh dimensions go
    into one all-reduce. With `stats`, returns this rank's `||x_local||^2` and `||removed_local||^2` summed over
    the items (over the ranks they sum to the global values); else None.
    """
    prepared, buckets = [], {}
    for x, basis, dim, anchor in items:
        _check_shape(x, "a constrained parameter")
        ranges = local_ranges(x)
        local = x.to_local()
        matrix = local.float() if x.ndim == 2 else local.float().unsqueeze(1)  # bias: (rows, 1); fp32: a view
        rows = ranges[0]
        cols = ranges[1] if x.ndim == 2 else slice(0, 1)
        u = basis[rows] if dim == 0 else basis[cols]
        partial = u.T @ matrix if dim == 0 else matrix @ u
        if anchor is not None:
            anchor = anchor.reshape(anchor.shape[0], -1)
            anchor = anchor[:, cols] if dim == 0 else anchor[rows]
        entry = {
            "x": x,
            "local": local,
            "matrix": matrix,
            "u": u,
            "dim": dim,
            "anchor": anchor,
            "coefficients": partial,
        }
        prepared.append(entry)
        mesh_dims = reduction_mesh_dims(x, dim)
        if mesh_dims:
            buckets.setdefault((id(x.device_mesh), mesh_dims), (x.device_mesh, []))[1].append(entry)
    for (_, mesh_dims), (mesh, entries) in buckets.items():
        flat = torch.cat([e["coefficients"].reshape(-1) for e in entries])
        for mesh_dim in mesh_dims:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group(mesh_dim))
        for e, chunk in zip(entries, flat.split([e["coefficients"].numel() for e in entries])):
            e["coefficients"] = chunk.view_as(e["coefficients"])
    total = removed = None
    for e in prepared:
        excess = (
            e["coefficients"] if e["anchor"] is None else e["coefficients"] - e["anchor"].to(e["coefficients"].device)
        )
        matrix, u = e["matrix"], e["u"]
        change = u @ excess if e["dim"] == 0 else excess @ u.T
        if stats:
            total = _add(total, torch.dot(matrix.reshape(-1), matrix.reshape(-1)))
            removed = _add(removed, torch.dot(change.reshape(-1), change.reshape(-1)))
        matrix.sub_(change)
        if matrix.data_ptr() != e["local"].data_ptr() or matrix.dtype != e["local"].dtype:
            e["local"].copy_(matrix.reshape(e["local"].shape))
    return (total, removed) if stats else None


def _add(a, b):
    return b if a is None else a + b


@torch.no_grad()
def copy_full_into_(x, value: torch.Tensor) -> None:
    """Write the whole-tensor `value` into DTensor `x`: each rank copies its own block."""
    local = x.to_local()
    block = value.reshape(x.shape)[local_ranges(x)]
    local.copy_(block.to(local.device, local.dtype))


def fsdp_version(args) -> int | None:
    """The FSDP version a `TrainingArguments` asks for: None without FSDP, else 1 or 2. With `args.fsdp` set:
    `fsdp_config["version"]` (or `"fsdp_version"`), default 2 as in transformers 5; with only accelerate's
    `ACCELERATE_USE_FSDP=true` (Axolotl, `accelerate launch`): `FSDP_VERSION`, default 1 as in accelerate."""
    import os

    fsdp = getattr(args, "fsdp", None)
    if fsdp:
        config = getattr(args, "fsdp_config", None) or {}
        config = config if isinstance(config, dict) else {}
        return int(config.get("version", config.get("fsdp_version", 2)))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def reject_fsdp(args, accelerator=None, projection: str | None = None) -> None:
    """Raise, before any step, when the run uses an FSDP setting GRASP does not support.

    FSDP2 (`fully_shard`, DTensor parameters; transformers' `fsdp_config={"version": 2}`, the default in
    transformers 5, or accelerate's `FSDP_VERSION=2`) is supported for `activations`, `weights` and `both`:
    the residual hooks act inside autograd, and `weights` mode projects each rank's shard (`grasp_trl.fsdp`).
    FSDP1 (flattened `FlatParameter`s) and `clamp`/`ablate` under FSDP2 (untested) are rejected, naming the alternative.
    The version comes from the accelerator's FSDP plugin when there is one, else from `args` and the
    environment (`grasp_trl.fsdp.fsdp_version`)."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    version = getattr(plugin, "fsdp_version", None) if plugin is not None else fsdp_version(args)
    if version is None:
        return
    if int(version) != 2:
        fsdp = getattr(args, "fsdp", None)
        raise ValueError(
            f"GRASP does not support FSDP1 (fsdp={fsdp or 'ACCELERATE_USE_FSDP'}, version {version}): "
            "its flattened parameters hide the per-module LoRA/weight tensors the projection acts on. "
            "Use FSDP2 (fsdp_config={'version': 2}; Axolotl: fsdp_version: 2; accelerate: "
            "fsdp_version: 2, see recipes/accelerate/fsdp2.yaml) or DeepSpeed ZeRO-3 "
            "(deepspeed=recipes/deepspeed/zero3.json; see docs/SUPPORT.md)."
        )
    if projection in FORWARD_EDITS:
        raise ValueError(
            f"GRASP: grasp_projection='{projection}' is not supported under FSDP (its block-output edit, "
            "decided in the root forward's hooks, is untested with fully_shard); use 'activations' or "
            f"'both' under FSDP2, or {projection} under DeepSpeed/single process (see docs/SUPPORT.md)."
        )
