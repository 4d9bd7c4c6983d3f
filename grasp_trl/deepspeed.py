"""Reading and writing whole parameters whether or not DeepSpeed ZeRO owns them.

Under ZeRO-1/2 the optimizer steps on fp32 master partitions and copies them into the working parameters
after every step; under ZeRO-3 the working parameters are partitioned too (`param.data` is empty outside a
gather). A post-step projection that only edits `param.data` is therefore undone at the next step (ZeRO-1/2)
or impossible (ZeRO-3). These helpers make `GradientProjector.project_parameters` exact in every case: the
full fp32 master value is read with `safe_get_full_fp32_param`, projected, written back with
`safe_set_full_fp32_param`, and the working copy is set from it (inside a gather under ZeRO-3).
Without DeepSpeed they are plain tensor reads and in-place copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _fp32_master(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The full fp32 master value DeepSpeed keeps for `param`, or None when DeepSpeed's optimizer doesn't own it.

    A ZeRO-3 parameter exists before its optimizer does (a model loaded under `zero.Init`, which is what
    `from_pretrained` does with a ZeRO-3 config): it has no master yet. ZeRO-1/2 parameters get `_hp_mapping`
    from the optimizer on every rank (None where another rank holds the whole fragment); reading the master
    is then a collective every rank must join.
    """
    if is_zero3(param):
        if getattr(param, "_z3_optimizer", None) is None:
            return None
    elif not hasattr(param, "_hp_mapping"):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def forget_fp32_masters(params: Iterable[torch.nn.Parameter]) -> None:
    """Drop the links a destroyed DeepSpeed optimizer left on its parameters (identify-then-project destroys
    stage 1's engine before stage 2 builds its own). ZeRO-1/2's `destroy()` sets `_hp_mapping` to None, which
    `safe_get_full_fp32_param` would read as an all-zero master; ZeRO-3 keeps `_z3_optimizer`. Until the next
    engine links its own, reads and writes then go to the parameters themselves."""
    for param in params:
        for attribute in ("_hp_mapping", "_z3_optimizer"):
            if hasattr(param, attribute):
                delattr(param, attribute)


def is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def managed_by_deepspeed(param: torch.nn.Parameter) -> bool:
    """True when DeepSpeed partitions `param` (ZeRO-3) or keeps an fp32 master of it (ZeRO-1/2): writes must
    then go through `update_params`."""
    return is_zero3(param) or hasattr(param, "_hp_mapping")


@torch.no_grad()
def full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole parameter in fp32: DeepSpeed's master copy when there is one, an FSDP2 DTensor gathered
    (collective: every rank must call it in the same order), else the parameter itself."""
    from .fsdp import is_dtensor

    if is_dtensor(param):
        return param.full_tensor().float()
    master = _fp32_master(param)
    if master is not None:
        return master.reshape(getattr(param, "ds_shape", param.shape)).float()
    if is_zero3(param):  # partitioned but not (yet) owned by a ZeRO optimizer: gather the working copy
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.data.float().clone()
    return param.data.float()


@torch.no_grad()
def update_params(updates: Iterable[tuple[torch.nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]) -> None:
    """Apply `new = fn(full_fp32(param))` to every parameter: fp32 master and working copy alike.

    Under ZeRO-3 the fp32 gathers are collective: every rank must call this with the same parameters in the
    same order (the projector's constraint list guarantees that).
    """
    from .fsdp import copy_full_into_, is_dtensor

    gathered_updates = []
    for param, fn in updates:
        if is_dtensor(param):  # FSDP2: gather, compute, each rank writes its own block
            copy_full_into_(param, fn(param.full_tensor().float()))
            continue
        master = _fp32_master(param)
        if master is None and not is_zero3(param):
            param.data.copy_(fn(param.data))
            continue
        source = master.reshape(getattr(param, "ds_shape", param.shape)) if master is not None else None
        new_value = fn(source.float()) if source is not None else None
        if master is not None:
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(param, new_value.to(master.dtype).reshape(master.shape))
        if is_zero3(param):
            gathered_updates.append((param, fn, new_value))
        else:
            param.data.copy_(new_value.to(param.dtype))
    if gathered_updates:
        import deepspeed

        params = [p for p, _, _ in gathered_updates]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            for param, fn, new_value in gathered_updates:
                value = new_value if new_value is not None else fn(param.data.float())
                param.data.copy_(value.to(param.dtype))
