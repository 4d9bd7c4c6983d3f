"""Stage 1 of GRASP: the spurious factor as the top singular directions of a naive LoRA update.

For a LoRA module `dW = s * B @ A`. Its residual-stream side is the output side for writers and the input
side for readers, so each module contributes a factor pair `dW_res = left @ right` with `left = s*B` (writer)
or `s*A^T` (reader), `left: d x r`. Stacking modules side by side, `M = [dW_1, dW_2, ...]` has the same left
singular vectors and values as `K = [left_1 R_1^T, left_2 R_2^T, ...]` where `right_i^T = Q_i R_i` (QR), because
`M M^T = K K^T`. `K` is `d x sum(r)`: `dW` is never formed, and memory stays `O((d + in) * r)` per module.
When `sum(r)` is large (a global basis over 80 layers of a 70B adapter) a randomised subspace iteration on `K`
gives the top singular directions without the `d x sum(r)` SVD.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping

import torch
from tqdm.auto import tqdm

from .deepspeed import full_fp32
from .directions import DirectionSet, sha256_of
from .modules import Role, block_index, classify, strip_adapter_suffix

Scope = Literal["per_layer", "global"]
EXACT_SVD_MAX_COLUMNS = 4096  # beyond this many stacked rank-1 columns, use randomised subspace iteration
SPECTRUM_LENGTH = 32  # singular values reported per layer
MIN_UPDATE_NORM = 1e-8  # ||dW||_F of the stacked update at or below this defines no direction (lora_B starts at 0)


@contextmanager
def single_threaded():
    """Run torch's CPU linear algebra on one thread inside the block, restoring the caller's setting after.

    Extraction is a long series of small LAPACK calls (QR of `in x r`, SVD of `d x sum r`) whose thread
    barriers cost more than the work; on a busy machine a 2-thread SVD of a 3584 x 64 matrix measured 45x slower
    than the 1-thread one (benchmarks/README.md). One thread is also what the large global case is fastest with
    there, and it is never more than ~2x slower on an idle machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class LoraFactor:
    """One LoRA module's update on the residual side: `dW_res = left @ right` (`left: d x r`, scale folded in)."""

    name: str
    layer: int
    role: Role
    left: torch.Tensor
    right: torch.Tensor


# -------------------------------------------------------------------------------------------- reading adapters
def _pattern_value(patterns: Mapping[str, float], name: str, default: float) -> float:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: a key matches a module name as a regex on a suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _scaling(config: Mapping, name: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _factor(name: str, layer: int, role: Role, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
            where: str) -> LoraFactor:
    """The residual-side factor of one module; NaN/Inf weights (a diverged run) are refused here, where every
    reader of adapters (saved or in memory, identification and the stopping rule) passes, naming `where`."""
    check_finite_lora(where, name, lora_A=lora_a, lora_B=lora_b)
    lora_a, lora_b = lora_a.detach().to("cpu", torch.float64), lora_b.detach().to("cpu", torch.float64)
    if role == "write":
        return LoraFactor(name, layer, role, scale * lora_b, lora_a)
    return LoraFactor(name, layer, role, scale * lora_a.T, lora_b.T)


def check_finite_lora(where: str, name: str, **sides: torch.Tensor) -> None:
    """Raise a ValueError naming `where`, module `name` and the side (`lora_A=...`, `lora_B=...`) when a LoRA
    weight holds NaN or Inf."""
    for side, tensor in sides.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where}: module {name}: {side} has {bad} NaN/Inf values of {tensor.numel()}; "
                             "expected finite adapter weights (did the run diverge?)")


def _selected(name: str, layer: int | None, role: Role | None, include_readers: bool) -> bool:
    return layer is not None and (role == "write" or (role == "read" and include_readers))


def factors_from_peft_model(model, *, include_readers: bool = False, target_modules=None,
                            adapter_name: str | None = None) -> list[LoraFactor]:
    """Residual-side LoRA factors of an in-memory PEFT model (active adapter unless `adapter_name`); under
    DeepSpeed ZeRO the whole fp32 weights are read (a collective: every rank must call it)."""
    factors = []
    for name, module, adapter_name, layer, role in residual_lora_modules(model, include_readers=include_readers,
                                                                        target_modules=target_modules,
                                                                        adapter_name=adapter_name):
        if getattr(module, "use_dora", {}).get(adapter_name, False):
            warnings.warn(f"{name}: DoRA magnitude vector ignored; extracting from B @ A only", stacklevel=2)
        factors.append(_factor(name, layer, role, full_fp32(module.lora_A[adapter_name].weight),
                               full_fp32(module.lora_B[adapter_name].weight), float(module.scaling[adapter_name]),
                               "<in-memory PEFT model>"))
    return factors


def residual_lora_modules(model, *, include_readers: bool = False, target_modules=None,
                          adapter_name: str | None = None) -> list[tuple]:
    """`(name, module, adapter, layer, role)` of the LoRA modules identification reads in an in-memory PEFT
    model: writers in a block (and readers with `include_readers`). Reads no weights, so the trainers check
    at construction that stage 1 will have something to identify from."""
    adapter_name = adapter_name or getattr(model, "active_adapter", "default")
    if isinstance(adapter_name, (list, tuple)):
        adapter_name = adapter_name[0]
    found = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter_name not in lora_a:
            continue
        layer, role = block_index(name), classify(name, target_modules)
        if _selected(name, layer, role, include_readers):
            found.append((name, module, adapter_name, layer, role))
    return found


def read_adapter_config(directory: Path) -> dict:
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


def factors_from_adapter_dir(directory: str | Path, *, include_readers: bool = False, target_modules=None,
                             compress: bool = False) -> tuple[list[LoraFactor], dict]:
    """Residual-side factors of a saved adapter, read with safetensors only (no base model).

    Returns the factors and the adapter config. Only the tensors of selected modules are read. With
    `compress`, each factor's `right` (`r x in`) is replaced as soon as it is read by the `r x r` matrix
    `R^T` of its QR (`right^T = Q R`): `right right^T`, hence the stacked core and the directions, are unchanged,
    and the memory held is `O(d r)` per module instead of `O((d + in) r)` (extraction uses this).
    """
    from safetensors import safe_open

    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{directory}: no adapter_model.safetensors (pickled .bin adapters are not read)")
    try:
        handle = safe_open(str(weights), framework="pt")
        keys = set(handle.keys())
    except Exception as exc:
        raise ValueError(f"{weights}: not a readable safetensors file ({exc})") from exc
    modules = sorted({strip_adapter_suffix(k) for k in keys if ".lora_A." in k or k.endswith(".lora_A.weight")})
    factors = []
    for name in tqdm(modules, desc="reading adapter", disable=len(modules) < 64, leave=False):
        layer, role = block_index(name), classify(name, target_modules)
        if not _selected(name, layer, role, include_readers):
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
        factor = _factor(name, layer, role, lora_a, lora_b, _scaling(config, name, lora_a.shape[0]), str(weights))
        if compress:
            factor.right = _triangular(factor.right).T
        factors.append(factor)
    if config.get("use_dora"):
        warnings.warn(f"{directory}: DoRA magnitude vectors ignored; extracting from B @ A only", stacklevel=2)
    return factors, config


# ------------------------------------------------------------------------------------------------ linear algebra
def stacked_core(factors: Iterable[LoraFactor]) -> torch.Tensor:
    """`K` (`d x sum r`) with `K K^T = M M^T` for `M` the side-by-side stack of the factors' `dW_res`."""
    return torch.cat([factor.left @ _triangular(factor.right).T for factor in factors], dim=1)


def _triangular(right: torch.Tensor) -> torch.Tensor:
    """`R` of `right^T = Q R` (`r x r`): `R^T R = right right^T`, all the core needs of `right`."""
    return torch.linalg.qr(right.T, mode="r")[1]


def top_singular(core: torch.Tensor, count: int, *, seed: int = 0, iterations: int = 6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`count` left singular vectors and singular values of `core`.

    Exact SVD when `core` is narrow, randomised subspace iteration (oversampled, orthonormalised each pass)
    otherwise. Signs are fixed so that each vector's largest-magnitude entry is positive (reproducibility).
    """
    d, columns = core.shape
    if columns <= EXACT_SVD_MAX_COLUMNS or columns <= count + 10:
        u, s, _ = torch.linalg.svd(core, full_matrices=False)
    else:
        width = min(columns, max(2 * count, count + 16))
        generator = torch.Generator().manual_seed(seed)
        probe = torch.randn(columns, width, generator=generator, dtype=core.dtype)
        basis = torch.linalg.qr(core @ probe)[0]
        for _ in range(iterations):
            basis = torch.linalg.qr(core @ (core.T @ basis))[0]
        u_small, s, _ = torch.linalg.svd(basis.T @ core, full_matrices=False)
        u = basis @ u_small
    u, s = u[:, :count], s[:count]
    signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    return u * signs, s


def choose_k(singular_values: torch.Tensor, total_energy: float, k: int | None, energy: float | None,
             max_k: int) -> int:
    """Fixed `k`, or the smallest `k <= max_k` whose directions capture `energy` of the squared spectrum."""
    if energy is None:
        return min(k, len(singular_values))
    captured = torch.cumsum(singular_values.double() ** 2, 0) / max(total_energy, 1e-300)
    reached = (captured >= energy).nonzero()
    chosen = int(reached[0]) + 1 if len(reached) else len(singular_values)
    return max(1, min(chosen, max_k))


# --------------------------------------------------------------------------------------------------- public
@single_threaded()
def extract_directions(adapter, k: int = 1, scope: Scope = "per_layer", *, energy: float | None = None,
                       max_k: int = 8, include_readers: bool = False, layers: Iterable[int] | None = None,
                       target_modules: Mapping[str, Role] | None = None, num_layers: int | None = None,
                       adapter_name: str | None = None) -> DirectionSet:
    """Identify the spurious factor as the top singular directions of a naive LoRA update.

    Args:
        adapter: a PEFT model in memory, or a saved adapter directory (read without the base model).
        k: directions per layer (or for the global basis); ignored when `energy` is given.
        scope: `per_layer` (one basis per block from that block's writers) or `global` (one basis from all
            blocks' writers stacked, stored for every layer).
        energy: if set, choose per layer the smallest `k <= max_k` capturing this fraction of the squared
            spectrum of the stacked update.
        include_readers: also stack the readers' input-side update (`dW^T`) of each block.
        layers: restrict the set to these block indices.
        target_modules: leaf name or regex -> "write"/"read", for architectures not known by name.
        num_layers: number of decoder blocks; read from the model or the base model's local config when
            omitted, else inferred from the adapter's module names (recorded in the metadata).
    """
    if scope not in ("per_layer", "global"):
        raise ValueError(f"scope: expected 'per_layer' or 'global', found {scope!r}")
    if energy is None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k: expected a positive integer, found {k!r}")
    if energy is not None and (isinstance(energy, bool) or not 0 < energy <= 1):
        raise ValueError(f"energy: expected a fraction in (0, 1], found {energy!r}")
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
        raise ValueError(f"max_k: expected a positive integer, found {max_k!r}")

    metadata: dict = {"scope": scope, "sides": "both" if include_readers else "write",
                      "selection": {"k": k} if energy is None else {"energy": energy, "max_k": max_k}}
    digest: Future | None = None
    if isinstance(adapter, (str, Path)):
        directory = Path(adapter)
        where = str(directory)
        weights = directory / "adapter_model.safetensors"
        digest = _hash_in_background(weights) if weights.is_file() else None
        factors, config = factors_from_adapter_dir(directory, include_readers=include_readers,
                                                   target_modules=target_modules, compress=True)
        metadata.update(source_adapter=str(directory.resolve()), base_model=config.get("base_model_name_or_path"),
                        base_model_revision=config.get("revision"))
        num_layers = num_layers or _layers_from_base_config(config.get("base_model_name_or_path"))
    else:
        factors = factors_from_peft_model(adapter, include_readers=include_readers, target_modules=target_modules,
                                          adapter_name=adapter_name)
        base_config = getattr(adapter, "config", None)
        metadata.update(source_adapter="<in-memory PEFT model>",
                        base_model=getattr(base_config, "_name_or_path", None))
        where = metadata["source_adapter"]
        if num_layers is None:
            from .modules import num_hidden_layers

            num_layers = num_hidden_layers(adapter)
    if not factors:
        raise ValueError(f"{metadata['source_adapter']}: no LoRA module on the residual stream "
                         f"({'writers or readers' if include_readers else 'writers: o_proj/down_proj-like'}) "
                         "found; target them with LoRA or pass include_readers=True")
    if num_layers is None:
        num_layers = max(f.layer for f in factors) + 1
        metadata["num_layers_inferred"] = True
    deepest = max(factors, key=lambda f: f.layer)
    if deepest.layer >= num_layers:
        raise ValueError(f"num_layers (--num-layers) = {num_layers}: {where} has a LoRA module in block "
                         f"{deepest.layer} ({deepest.name}); expected num_layers >= {deepest.layer + 1}")
    metadata["module_classification"] = {f.name: f.role for f in factors}

    groups: dict[int, list[LoraFactor]] = {}
    for factor in factors:
        groups.setdefault(factor.layer, []).append(factor)
    wanted = sorted(groups) if layers is None else sorted(set(int(l) for l in layers))
    count_needed = max_k if energy is not None else k

    bases, spectra, energies = {}, {}, {}
    if scope == "per_layer":
        for layer in tqdm(wanted, desc="identifying", disable=len(wanted) < 16, leave=False):
            if layer not in groups:
                continue
            core = stacked_core(groups[layer])
            basis, values = _basis(core, k, energy, max_k, count_needed, f"{where}: block {layer}")
            bases[layer], spectra[layer], energies[layer] = basis, values, _captured(core, values, basis.shape[1])
    else:
        core = stacked_core(f for layer in wanted for f in groups.get(layer, []))
        basis, values = _basis(core, k, energy, max_k, count_needed, f"{where}: the stacked update")
        for layer in wanted:
            bases[layer] = basis
        spectra["global"], energies["global"] = values, _captured(core, values, basis.shape[1])
    metadata["singular_values"] = {str(l): [float(v) for v in s] for l, s in spectra.items()}
    metadata["energy_captured"] = {str(l): e for l, e in energies.items()}
    metadata["hidden_size"] = factors[0].left.shape[0]
    if digest is not None:
        metadata["source_adapter_sha256"] = digest.result()
    return DirectionSet({l: b.float() for l, b in bases.items()}, num_layers, metadata,
                        source=f"directions identified from {where}")  # what a refusal of the set names


def _hash_in_background(path: Path) -> Future:
    """sha256 of `path` on a worker thread. hashlib releases the GIL, so hashing a multi-GB adapter overlaps the
    (single-threaded) reading and linear algebra instead of adding to it; the digest is collected at the end."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grasp-sha256")
    future = pool.submit(sha256_of, path)
    pool.shutdown(wait=False)
    return future


def _basis(core, k, energy, max_k, count_needed, where: str):
    """Top directions of one stacked core, after refusing the cores that define none: an update of norm at
    most `MIN_UPDATE_NORM` (its directions would be rounding noise), and a fixed `k` above the total LoRA
    rank stacked there (only that many directions exist; metadata would record a `k` that was not taken)."""
    norm = float(core.norm())
    if not norm > MIN_UPDATE_NORM:
        raise ValueError(f"{where}: LoRA update norm ||dW||_F = {norm:.3g}, expected > {MIN_UPDATE_NORM:g}: too "
                         "small to define a direction (an untrained adapter? lora_B starts at zero)")
    if energy is None and k > core.shape[1]:
        raise ValueError(f"{where}: k={k} directions asked, but the LoRA update there has total rank "
                         f"{core.shape[1]}; expected k <= {core.shape[1]}")
    values_wanted = min(max(count_needed, SPECTRUM_LENGTH), min(core.shape))
    vectors, values = top_singular(core, values_wanted)
    chosen = choose_k(values, float(core.pow(2).sum()), k, energy, max_k)
    return vectors[:, :chosen], values


def _captured(core, values, chosen) -> float:
    total = float(core.pow(2).sum())
    return float(values[:chosen].double().pow(2).sum() / total) if total > 0 else 0.0


def _layers_from_base_config(base: str | None) -> int | None:
    if not base or not (Path(base) / "config.json").is_file():
        return None
    config = json.loads((Path(base) / "config.json").read_text())
    config = config.get("text_config", config)
    return next((int(config[key]) for key in ("num_hidden_layers", "n_layer", "num_layers") if key in config), None)
