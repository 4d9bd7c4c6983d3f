"""Everything grasp-trl knows about LoRA, once: where an adapter's modules are, which side of an update faces
the residual stream, and how a saved adapter is read and checked against a base model.

A LoRA module's update is `dW = s * B @ A` (`B: out x r`, `A: r x in`). Its residual-stream side is the output
side for writers and the input side for readers (`modules.py`), so on that side the update is a factor pair
`dW_res = left @ right` with `left: d x r`:

* writer: `left = s B`, `right = A`       (`dW_res = dW`)
* reader: `left = s A^T`, `right = B^T`   (`dW_res = dW^T`)

Identification stacks the `left @ right` of many modules (`identify.py`); `weights` mode constrains `B`
(writers, rows) or `A` (readers, columns) (`constraints.py`); the saved-adapter check reads the same pairs
(`verify.py`). All three take the pair from `residual_side`.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .deepspeed import full_fp32
from .modules import Role, block_index, classify, strip_adapter_suffix

ReaderLayer = Literal["own", "input"]
READER_LAYERS = ("own", "input")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraFactor:
    """One LoRA module's update on the residual side: `dW_res = left @ right` (`left: d x r`, scale folded in)."""

    name: str
    layer: int
    role: Role
    left: torch.Tensor
    right: torch.Tensor

    def compressed(self) -> LoraFactor:
        """The same factor with `right` (`r x in`) replaced by `R^T` (`r x r`) from `right^T = Q R`: `right right^T`,
        hence the Gram of `dW_res` and its left singular vectors, are unchanged; memory drops to `O(d r)`."""
        return replace(self, right=triangular_root(self.right).T)


def triangular_root(right: torch.Tensor) -> torch.Tensor:
    """`R` of `right^T = Q R` (`r x r`): `R^T R = right right^T`, all the residual-side Gram needs of `right`."""
    return torch.linalg.qr(right.T, mode="r")[1]


def residual_side(
    role: Role, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(left, right)` with `left @ right` the update on its residual side: `(s B, A)` for a writer,
    `(s A^T, B^T)` for a reader."""
    return (scale * lora_b, lora_a) if role == "write" else (scale * lora_a.T, lora_b.T)


def constrained_factor(role: Role) -> tuple[str, int]:
    """The LoRA factor whose residual-side dimension `weights` mode constrains: writer `B` on its rows (dim 0),
    reader `A` on its columns (dim 1). Constraining that factor alone keeps `U^T dW = 0` (or `dW U = 0`)."""
    return ("lora_B", 0) if role == "write" else ("lora_A", 1)


def basis_layer(role: Role, layer: int, reader_layer: ReaderLayer = "own") -> int:
    """Which block's basis a module of block `layer` is constrained on: its own (writers; readers with
    `reader_layer="own"`), or the stream a reader actually reads (`"input"`: block `layer - 1`, -1 for block 0)."""
    return layer - 1 if role == "read" and reader_layer == "input" else layer


# -------------------------------------------------------------------------------------------- in-memory models
def active_adapter(model, adapter_name: str | None = None) -> str:
    """`adapter_name`, else the PEFT model's (first) active adapter, else PEFT's `"default"`."""
    adapter = adapter_name or getattr(model, "active_adapter", "default")
    return adapter[0] if isinstance(adapter, (list, tuple)) else adapter


def lora_modules(model, adapter_name: str | None = None) -> Iterator[tuple[str, torch.nn.Module, str]]:
    """`(name, module, adapter)` for every module of `model` holding the adapter's `lora_A`/`lora_B`."""
    adapter = active_adapter(model, adapter_name)
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and adapter in lora_a:
            yield name, module, adapter


def residual_lora_modules(
    model, *, include_readers: bool = False, target_modules=None, adapter_name: str | None = None
) -> list[tuple]:
    """`(name, module, adapter, layer, role)` of the LoRA modules identification reads: writers in a decoder
    block (and readers with `include_readers`). Reads no weights, so the trainers check at construction that
    stage 1 will have something to identify from."""
    found = []
    for name, module, adapter in lora_modules(model, adapter_name):
        layer, role = block_index(name), classify(name, target_modules)
        if _selected(layer, role, include_readers):
            found.append((name, module, adapter, layer, role))
    return found


def _selected(layer: int | None, role: Role | None, include_readers: bool) -> bool:
    return layer is not None and (role == "write" or (role == "read" and include_readers))


def factors_from_peft_model(
    model, *, include_readers: bool = False, target_modules=None, adapter_name: str | None = None
) -> list[LoraFactor]:
    """Residual-side LoRA factors of an in-memory PEFT model (active adapter unless `adapter_name`); under
    DeepSpeed ZeRO the whole fp32 weights are read (a collective: every rank must call it)."""
    factors = []
    for name, module, adapter, layer, role in residual_lora_modules(
        model, include_readers=include_readers, target_modules=target_modules, adapter_name=adapter_name
    ):
        if getattr(module, "use_dora", {}).get(adapter, False):
            warnings.warn(f"{name}: DoRA magnitude vector ignored; extracting from B @ A only", stacklevel=2)
        factors.append(
            _factor(
                name,
                layer,
                role,
                full_fp32(module.lora_A[adapter].weight),
                full_fp32(module.lora_B[adapter].weight),
                float(module.scaling[adapter]),
                "<in-memory PEFT model>",
            )
        )
    return factors


def _factor(
    name: str, layer: int, role: Role, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, where: str
) -> LoraFactor:
    """The residual-side factor of one module, in float64 on the CPU; NaN/Inf weights (a diverged run) are
    refused here, where every reader of adapters (saved or in memory) passes, naming `where`."""
    check_finite_lora(where, name, lora_A=lora_a, lora_B=lora_b)
    lora_a, lora_b = lora_a.detach().to("cpu", torch.float64), lora_b.detach().to("cpu", torch.float64)
    return LoraFactor(name, layer, role, *residual_side(role, lora_a, lora_b, scale))


def check_finite_lora(where: str, name: str, **sides: torch.Tensor) -> None:
    """Raise a ValueError naming `where`, module `name` and the side (`lora_A=...`, `lora_B=...`) when a LoRA
    weight holds NaN or Inf."""
    for side, tensor in sides.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{where}: module {name}: {side} has {bad} NaN/Inf values of {tensor.numel()}; "
                "expected finite adapter weights (did the run diverge?)"
            )


# ----------------------------------------------------------------------------------------------- saved adapters
def read_adapter_config(directory: str | Path) -> dict:
    """A saved adapter's `adapter_config.json`; a missing directory, a non-adapter or a non-LoRA adapter is one
    line naming the path."""
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: adapter directory not found")
    if not config_path.is_file():
        raise ValueError(f"{directory}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{config_path}: peft_type is {peft_type!r}; GRASP identifies from LoRA adapters only")
    return config


def open_adapter_weights(directory: str | Path):
    """`(path, handle)`: a saved adapter's safetensors file opened lazily (nothing read yet). No pickle: a
    `.bin`-only adapter is refused; an unreadable file is one line naming it."""
    from safetensors import safe_open

    weights = Path(directory) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{directory}: no {ADAPTER_WEIGHTS} (pickled .bin adapters are not read)")
    try:
        return weights, safe_open(str(weights), framework="pt")
    except Exception as exc:
        message = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"{weights}: not a readable safetensors file ({message})") from exc


def _side_of(key: str) -> str | None:
    return "lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else None


def _pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: a key matches a module name as a regex on a suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def scaling(config: Mapping, name: str, rank: int) -> float:
    """PEFT's `s` for module `name` of a saved adapter: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def factors_from_adapter_dir(
    directory: str | Path, *, include_readers: bool = False, target_modules=None, compress: bool = False
) -> tuple[list[LoraFactor], dict]:
    """Residual-side factors of a saved adapter, read with safetensors only (no base model).

    Returns the factors and the adapter config. Only the tensors of selected modules are read. With `compress`,
    each factor is `compressed()` as soon as it is read, so the memory held is `O(d r)` per module instead of
    `O((d + in) r)` (identification uses this).
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights, handle = open_adapter_weights(directory)
    keys = set(handle.keys())
    modules = sorted({strip_adapter_suffix(k) for k in keys if ".lora_A." in k})
    factors = []
    for name in tqdm(modules, desc="reading adapter", disable=len(modules) < 64, leave=False):
        layer, role = block_index(name), classify(name, target_modules)
        if not _selected(layer, role, include_readers):
            continue
        a_key = next((k for k in (f"{name}.lora_A.weight", f"{name}.lora_A.default.weight") if k in keys), None)
        b_key = next((k for k in (f"{name}.lora_B.weight", f"{name}.lora_B.default.weight") if k in keys), None)
        if a_key is None or b_key is None:
            raise ValueError(f"{weights}: module {name} has lora_A but no matching lora_B")
        try:
            lora_a, lora_b = handle.get_tensor(a_key), handle.get_tensor(b_key)
        except Exception as exc:
            raise ValueError(f"{weights}: cannot read {a_key}/{b_key} ({exc}); the file may be truncated") from exc
        if lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(f"{weights}: {name}: lora_A has rank {lora_a.shape[0]}, lora_B has {lora_b.shape[1]}")
        factor = _factor(name, layer, role, lora_a, lora_b, scaling(config, name, lora_a.shape[0]), str(weights))
        factors.append(factor.compressed() if compress else factor)
    if config.get("use_dora"):
        warnings.warn(f"{directory}: DoRA magnitude vectors ignored; extracting from B @ A only", stacklevel=2)
    return factors, config


def check_adapter_fits(model, adapter_dir: str | Path) -> None:
    """Compare a saved adapter's LoRA shapes with the base model's modules (from the safetensors header) and
    refuse NaN/Inf weights, so an adapter trained on another model is reported by module name instead of a
    state-dict dump, before PEFT loads it."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights, handle = open_adapter_weights(adapter_dir)
    modules = dict(model.named_modules())
    trained_on = config.get("base_model_name_or_path") or "another model"
    base_name = model.config._name_or_path
    for key in handle.keys():
        side = _side_of(key)
        if side is None:
            continue
        shape = tuple(handle.get_slice(key).get_shape())
        name = strip_adapter_suffix(key).removeprefix("base_model.model.")
        module = modules.get(name)
        if module is None or getattr(module, "weight", None) is None:
            raise ValueError(
                f"{adapter_dir}: adapter module {name} does not exist in base model "
                f"{base_name} (the adapter was trained on {trained_on})"
            )
        out_features, in_features = (
            module.weight.shape[::-1] if type(module).__name__ == "Conv1D" else module.weight.shape[:2]
        )
        found, expected = (shape[1], in_features) if side == "lora_A" else (shape[0], out_features)
        if found != expected:
            raise ValueError(
                f"{adapter_dir}: {name}.{side} has shape {shape}, but base model {base_name} needs "
                f"{'in' if side == 'lora_A' else 'out'}_features={expected} there (the adapter "
                f"was trained on {trained_on})"
            )
    for key in handle.keys():  # NaN/Inf would make every reading NaN
        side = _side_of(key)
        if side is not None:
            check_finite_lora(str(weights), strip_adapter_suffix(key), **{side: handle.get_tensor(key)})
