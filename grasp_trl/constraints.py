"""Which parameters `weights` mode constrains, and how they are batched.

A *constraint* is one parameter whose change must stay orthogonal to a basis `U` on its residual-side
dimension: `U^T (W - W_anchor) = 0` (dim 0: writer LoRA `B`, full writer weights and biases) or
`(W - W_anchor) U = 0` (dim 1: reader LoRA `A`, full reader weights). LoRA constraints have a zero anchor (the
update `B A` itself must be orthogonal; `lora.py` says which factor carries the residual side); full
fine-tuning keeps the pretrained component `U^T W0` / `W0 U` captured when the constraints are found.

`find_constraints` discovers them in a model: LoRA factors when it has LoRA layers, else trainable full
weights, embeddings and `lm_head` included, GPT-2's transposed `Conv1D`, tied weights (one constraint on the
union of both bases). `group_constraints` batches the small unanchored ones by shape for one batched matmul.
The projection itself is `projection.py`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .directions import DirectionSet
from .lora import ReaderLayer, basis_layer, constrained_factor, lora_modules
from .modules import block_index, classify, classify_all, linear_module_names

Sides = Literal["write", "read", "both"]
SIDES = ("write", "read", "both")
SIDE_WORDS = {"write": "writer", "read": "reader", "both": "writer or reader"}
BasisLookup = Callable[[int, torch.device], torch.Tensor]  # (layer, device) -> U_l there, fp32


@dataclass
class Constraint:
    """One parameter whose change must stay orthogonal to `basis` on its residual-side dimension `dim`."""

    name: str
    param: nn.Parameter
    basis: torch.Tensor  # d x k, fp32, on the parameter's device
    dim: int  # 0: rows live in the residual stream; 1: columns do
    anchor: torch.Tensor | None = None  # U^T W0 (dim 0) or W0 U (dim 1); None means zero (LoRA)
    hook: object = field(default=None, repr=False)
    owner: nn.Module | None = field(default=None, repr=False)  # module holding the parameter (FSDP2 swaps it)
    attr: str = "weight"

    def rebind(self) -> bool:
        """Follow the owner's current parameter (FSDP2's `fully_shard` replaces parameters by DTensor ones
        after the projector attached, e.g. when accelerate prepares the model); True when it changed."""
        current = getattr(self.owner, self.attr, None) if self.owner is not None else None
        if current is None or current is self.param:
            return False
        self.param = current
        if self.basis.device != current.device:
            self.basis = self.basis.to(current.device)
        return True

    def component(self, weight: torch.Tensor) -> torch.Tensor:
        """`U^T W` (dim 0) or `W U` (dim 1) in fp32."""
        w32 = weight.float()
        if self.dim == 0:
            return self.basis.T @ w32.reshape(w32.shape[0], -1)
        return w32 @ self.basis


@dataclass
class ConstraintGroup:
    """Constraints projected together: small unanchored parameters (LoRA factors) of one shape, dtype, device
    and residual dimension, as one stack in one batched matmul; or a single constraint, in place (large LoRA
    factors, and every anchored full fine-tuning weight, so no large weight is ever copied into a stack)."""

    constraints: list[Constraint]
    bases: torch.Tensor  # (n, d, k); (d, k) for a group of one

    @property
    def dim(self) -> int:
        return self.constraints[0].dim

    @property
    def anchor(self) -> torch.Tensor | None:
        return self.constraints[0].anchor if len(self.constraints) == 1 else None


def group_constraints(constraints: list[Constraint], max_stack_numel: int | None = None) -> list[ConstraintGroup]:
    """Batch the unanchored constraints by (shape, dtype, device, dim); anchored ones stay alone.

    Only parameters of at most `max_stack_numel` elements are stacked; larger ones are projected one by one,
    in place. Default: 2**16 on CPU, where one aten call costs about as much as copying a few hundred KB, and
    2**24 on accelerators, where a kernel launch costs more than copying megabytes (measured:
    benchmarks/README.md, "Training overhead").
    """
    buckets: dict[object, list[Constraint]] = {}
    for constraint in constraints:
        param = constraint.param
        limit = max_stack_numel if max_stack_numel is not None else 1 << (16 if param.device.type == "cpu" else 24)
        stackable = constraint.anchor is None and param.numel() <= limit
        key = (tuple(param.shape), param.dtype, param.device, constraint.dim) if stackable else id(constraint)
        buckets.setdefault(key, []).append(constraint)
    return [
        ConstraintGroup(members, members[0].basis if len(members) == 1 else torch.stack([c.basis for c in members]))
        for members in buckets.values()
    ]


def find_constraints(
    model: nn.Module,
    directions: DirectionSet,
    sides: Sides = "both",
    *,
    reader_layer: ReaderLayer = "own",
    target_modules=None,
    adapter_name: str | None = None,
    basis: BasisLookup | None = None,
) -> list[Constraint]:
    """The constraints `weights` mode enforces on `model` for `directions` (possibly none): on the LoRA factors
    of `adapter_name` (default: the active adapter) when the model has LoRA layers, else on its trainable full
    weights with their pretrained components anchored (raising when there is none). `basis(layer, device)`
    gives `U_layer` on a device (default: a fresh copy each time)."""
    basis = basis or (lambda layer, device: directions.bases[layer].to(device, torch.float32))
    lora = _lora_constraints(model, directions, sides, reader_layer, target_modules, adapter_name, basis)
    if lora is not None:
        return lora
    return _full_constraints(model, directions, sides, reader_layer, target_modules, basis)


def _wants(sides: Sides, role: str) -> bool:
    return sides == "both" or (sides == "write") == (role == "write")


def _basis_layer(directions: DirectionSet, role: str, layer: int, reader_layer: ReaderLayer) -> int | None:
    layer = basis_layer(role, layer, reader_layer)
    return layer if layer in directions.bases else None


def _lora_constraints(
    model, directions, sides, reader_layer, target_modules, adapter_name, basis
) -> list[Constraint] | None:
    """Constraints on LoRA A/B, or None when the model has no LoRA layers (full fine-tuning)."""
    constraints, seen_lora = [], False
    for name, module, adapter in lora_modules(model, adapter_name):
        seen_lora = True
        if getattr(module, "use_dora", {}).get(adapter, False):
            raise ValueError(
                f"{name}: DoRA rescales the whole weight by a learned magnitude, so the "
                "update cannot be kept orthogonal to the directions; use projection="
                "'activations' with DoRA, or plain LoRA with 'weights'"
            )
        role, layer = classify(name, target_modules), block_index(name)
        if role is None or layer is None or not _wants(sides, role):
            continue
        layer = _basis_layer(directions, role, layer, reader_layer)
        if layer is None:
            continue
        factor, dim = constrained_factor(role)
        owner = getattr(module, factor)[adapter]
        constraints.append(
            Constraint(f"{name}.{factor}", owner.weight, basis(layer, owner.weight.device), dim, owner=owner)
        )
    return constraints if seen_lora else None


def _full_constraints(model, directions, sides, reader_layer, target_modules, basis) -> list[Constraint]:
    """Constraints on trainable full weights (and writer biases) with the pretrained component anchored."""
    from .deepspeed import full_fp32

    modules = dict(model.named_modules())
    candidates = linear_module_names(model) + [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
    last = max(directions.bases)
    by_param: dict[tuple[int, int], Constraint] = {}
    for item in classify_all(candidates, target_modules, include_global=True):
        if not _wants(sides, item.role):
            continue
        module = modules[item.name]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
            continue
        if item.layer is None:  # embeddings write into block 0's input; lm_head reads the last stream
            layer = 0 if item.role == "write" else last
            layer = layer if layer in directions.bases else None
        else:
            layer = _basis_layer(directions, item.role, item.layer, reader_layer)
        if layer is None:
            continue
        is_embedding = isinstance(module, nn.Embedding) or item.layer is None
        transposed = type(module).__name__ == "Conv1D"  # GPT-2 stores (in, out)
        residual_on_rows = (item.role == "write") != transposed and not is_embedding
        targets = [(item.name + ".weight", weight, 0 if residual_on_rows else 1, "weight")]
        bias = getattr(module, "bias", None)
        if item.role == "write" and isinstance(bias, nn.Parameter) and bias.requires_grad and not is_embedding:
            targets.append((item.name + ".bias", bias, 0, "bias"))
        for name, param, dim, attr in targets:
            u = basis(layer, param.device)
            key = (id(param), dim)
            if key in by_param:  # tied weights: constrain the union of both bases
                merged = torch.linalg.qr(torch.cat([by_param[key].basis, u], dim=1))[0]
                by_param[key].basis, by_param[key].name = merged, by_param[key].name + "+" + name
            else:
                by_param[key] = Constraint(name, param, u, dim, owner=module, attr=attr)
    for constraint in by_param.values():
        if constraint.param.is_meta:
            raise ValueError(
                f"{constraint.name} is on the meta device (FSDP's cpu_ram_efficient_loading loads "
                "the model on rank 0 only): weights projection of full fine-tuning must capture "
                "the pretrained component U^T W0 on every rank; set "
                "fsdp_cpu_ram_efficient_loading: false (or use LoRA)"
            )
        constraint.anchor = constraint.component(full_fp32(constraint.param)).detach().clone()
    if not by_param:
        raise ValueError(
            "weights projection found nothing to constrain: no LoRA layer and no trainable "
            "writer/reader weight in a block with a direction"
        )
    return list(by_param.values())
