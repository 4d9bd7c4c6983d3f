"""Stage 1 of GRASP: the spurious factor as the top singular directions of a naive LoRA update.

Each LoRA module contributes its residual-side factor pair `dW_res = left @ right` (`left: d x r`; `lora.py`
says which side that is). Stacking modules side by side, `M = [dW_1, dW_2, ...]` has the same left
singular vectors and values as `K = [left_1 R_1^T, left_2 R_2^T, ...]` where `right_i^T = Q_i R_i` (QR), because
`M M^T = K K^T`. `K` is `d x sum(r)`: `dW` is never formed, and memory stays `O((d + in) * r)` per module.
When `sum(r)` is large (a global basis over 80 layers of a 70B adapter) a randomised subspace iteration on `K`
gives the top singular directions without the `d x sum(r)` SVD.

Reading (`read_factors`: a PEFT model or a saved directory -> factors and provenance) is apart from fitting
(`fit_directions`: factors -> bases and spectrum); `extract_directions` is the two in a row, and
`identify_from` what stage 1 and the Axolotl CLI run: extract, then save the set and its spectrum beside the
adapter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .directions import DirectionSet, atomic_write, sha256_of
from .lora import ADAPTER_WEIGHTS, LoraFactor, factors_from_adapter_dir, factors_from_peft_model, triangular_root
from .modules import Role, config_value, num_hidden_layers

Scope = Literal["per_layer", "global"]
EXACT_SVD_MAX_COLUMNS = 4096  # beyond this many stacked rank-1 columns, use randomised subspace iteration
SPECTRUM_LENGTH = 32  # singular values reported per layer
MIN_UPDATE_NORM = 1e-8  # ||dW||_F of the stacked update at or below this defines no direction (lora_B starts at 0)


@contextmanager
def single_threaded():
    """Run torch's CPU linear algebra on one thread inside the block, restoring the caller's setting after.

    Extraction is a long series of small LAPACK calls (QR of `in x r`, SVD of `d x sum r`) whose thread
    barriers cost more than the work, most of all on a busy machine; one thread is also what the large global
    case is fastest with (measurements: benchmarks/README.md, "Identification cost").
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------ linear algebra
def stacked_core(factors: Iterable[LoraFactor]) -> torch.Tensor:
    """`K` (`d x sum r`) with `K K^T = M M^T` for `M` the side-by-side stack of the factors' `dW_res`."""
    return torch.cat([factor.left @ triangular_root(factor.right).T for factor in factors], dim=1)


def top_singular(
    core: torch.Tensor, count: int, *, seed: int = 0, iterations: int = 6
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


def choose_k(
    singular_values: torch.Tensor, total_energy: float, k: int | None, energy: float | None, max_k: int
) -> int:
    """Fixed `k`, or the smallest `k <= max_k` whose directions capture `energy` of the squared spectrum."""
    if energy is None:
        return min(k, len(singular_values))
    captured = torch.cumsum(singular_values.double() ** 2, 0) / max(total_energy, 1e-300)
    reached = (captured >= energy).nonzero()
    chosen = int(reached[0]) + 1 if len(reached) else len(singular_values)
    return max(1, min(chosen, max_k))


# --------------------------------------------------------------------------------------------------- public
@dataclass
class AdapterReading:
    """What `read_factors` found: the residual-side factors, where they came from (named in every error), the
    number of decoder blocks, provenance metadata for the direction file, and the adapter file's sha256 (being
    computed on a worker thread, for saved adapters)."""

    factors: list[LoraFactor]
    where: str
    num_layers: int
    metadata: dict = field(default_factory=dict)
    digest: Future | None = None


def read_factors(
    adapter,
    *,
    include_readers: bool = False,
    target_modules: Mapping[str, Role] | None = None,
    num_layers: int | None = None,
    adapter_name: str | None = None,
) -> AdapterReading:
    """The residual-side LoRA factors of `adapter` (a PEFT model, or a saved adapter directory read without the
    base model), refusing an adapter with none. `num_layers` defaults to the model's, or the base model's local
    config, else the deepest block the adapter touches (recorded as inferred)."""
    if isinstance(adapter, (str, Path)):
        directory = Path(adapter)
        weights = directory / ADAPTER_WEIGHTS
        digest = _hash_in_background(weights) if weights.is_file() else None
        factors, config = factors_from_adapter_dir(
            directory, include_readers=include_readers, target_modules=target_modules, compress=True
        )
        base = config.get("base_model_name_or_path")
        metadata = {
            "source_adapter": str(directory.resolve()),
            "base_model": base,
            "base_model_revision": config.get("revision"),
        }
        reading = AdapterReading(
            factors, str(directory), num_layers or _layers_from_base_config(base) or 0, metadata, digest
        )
    else:
        factors = factors_from_peft_model(
            adapter, include_readers=include_readers, target_modules=target_modules, adapter_name=adapter_name
        )
        metadata = {
            "source_adapter": "<in-memory PEFT model>",
            "base_model": getattr(getattr(adapter, "config", None), "_name_or_path", None),
        }
        reading = AdapterReading(
            factors, metadata["source_adapter"], num_layers or num_hidden_layers(adapter), metadata
        )
    if not factors:
        modules = "writers or readers" if include_readers else "writers: o_proj/down_proj-like"
        raise ValueError(
            f"{reading.metadata['source_adapter']}: no LoRA module on the residual stream ({modules}) "
            "found; target them with LoRA or pass include_readers=True"
        )
    deepest = max(factors, key=lambda f: f.layer)
    if not reading.num_layers:
        reading.num_layers = deepest.layer + 1
        reading.metadata["num_layers_inferred"] = True
    if deepest.layer >= reading.num_layers:
        raise ValueError(
            f"num_layers (--num-layers) = {reading.num_layers}: {reading.where} has a LoRA module in "
            f"block {deepest.layer} ({deepest.name}); expected num_layers >= {deepest.layer + 1}"
        )
    return reading


def fit_directions(
    factors: list[LoraFactor],
    num_layers: int,
    k: int = 1,
    scope: Scope = "per_layer",
    *,
    energy: float | None = None,
    max_k: int = 8,
    layers: Iterable[int] | None = None,
    where: str = "the LoRA update",
    metadata: Mapping | None = None,
) -> DirectionSet:
    """The top singular directions of the stacked residual-side update, per block (`per_layer`) or one basis
    from every block's factors (`global`, stored for every layer), with the spectrum in the metadata."""
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
    return DirectionSet(
        {l: b.float() for l, b in bases.items()},
        num_layers,
        {
            **(metadata or {}),
            "module_classification": {f.name: f.role for f in factors},
            "singular_values": {str(l): [float(v) for v in s] for l, s in spectra.items()},
            "energy_captured": {str(l): e for l, e in energies.items()},
            "hidden_size": factors[0].left.shape[0],
        },
        source=f"directions identified from {where}",
    )  # what a refusal of the set names


@single_threaded()
def extract_directions(
    adapter,
    k: int = 1,
    scope: Scope = "per_layer",
    *,
    energy: float | None = None,
    max_k: int = 8,
    include_readers: bool = False,
    layers: Iterable[int] | None = None,
    target_modules: Mapping[str, Role] | None = None,
    num_layers: int | None = None,
    adapter_name: str | None = None,
) -> DirectionSet:
    """Identify the spurious factor as the top singular directions of a naive LoRA update.

    Args:
        adapter: a PEFT model in memory, or a saved adapter directory (read without the base model).
        k: directions per layer (or for the global basis); ignored when `energy` is given.
        scope: `per_layer` (one basis per block from that block's writers) or `global` (one basis from all
            blocks' writers stacked, stored for every layer).
        energy: if set, choose per layer the smallest `k <= max_k` capturing this fraction of the squared
            spectrum of the stacked update.
        max_k: the most directions `energy` may choose.
        include_readers: also stack the readers' input-side update (`dW^T`) of each block.
        layers: restrict the set to these block indices.
        target_modules: leaf name or regex -> "write"/"read", for architectures not known by name.
        num_layers: number of decoder blocks; read from the model or the base model's local config when
            omitted, else inferred from the adapter's module names (recorded in the metadata).
        adapter_name: the PEFT adapter to read in an in-memory model (default: the active one).
    """
    if scope not in ("per_layer", "global"):
        raise ValueError(f"scope: expected 'per_layer' or 'global', found {scope!r}")
    if energy is None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k: expected a positive integer, found {k!r}")
    if energy is not None and (isinstance(energy, bool) or not 0 < energy <= 1):
        raise ValueError(f"energy: expected a fraction in (0, 1], found {energy!r}")
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
        raise ValueError(f"max_k: expected a positive integer, found {max_k!r}")
    reading = read_factors(
        adapter,
        include_readers=include_readers,
        target_modules=target_modules,
        num_layers=num_layers,
        adapter_name=adapter_name,
    )
    metadata = {
        "scope": scope,
        "sides": "both" if include_readers else "write",
        "selection": {"k": k} if energy is None else {"energy": energy, "max_k": max_k},
        **reading.metadata,
    }
    directions = fit_directions(
        reading.factors,
        reading.num_layers,
        k,
        scope,
        energy=energy,
        max_k=max_k,
        layers=layers,
        where=reading.where,
        metadata=metadata,
    )
    if reading.digest is not None:
        return directions.with_metadata(source_adapter_sha256=reading.digest.result())
    return directions


def identify_from(
    adapter_dir: str | Path, args, num_layers: int | None = None, stopping: dict | None = None
) -> DirectionSet:
    """Extract the directions the `grasp_*` keys of `args` (a `GraspArguments`) describe from a saved stage-1
    adapter; write them (`DIRECTIONS_FILENAME`) and the spectrum (with the stopping rule's trace when stage 1
    stopped by it) beside it. Returns the set as loaded from the file written."""
    from .config import DIRECTIONS_FILENAME

    adapter_dir = Path(adapter_dir)
    directions = extract_directions(
        adapter_dir,
        k=args.grasp_num_directions,
        scope=args.grasp_scope,
        energy=args.grasp_energy,
        max_k=args.grasp_num_directions,
        include_readers=args.grasp_include_readers,
        target_modules=args.grasp_target_modules,
        num_layers=num_layers,
    )
    directions.save(adapter_dir / DIRECTIONS_FILENAME)
    spectrum = {
        "singular_values": directions.metadata["singular_values"],
        "energy_captured": directions.metadata["energy_captured"],
        "k": {str(l): directions.k(l) for l in directions.bases},
    }
    if stopping is not None:
        spectrum["stopping"] = stopping
    atomic_write(adapter_dir / "spectrum.json", lambda tmp: Path(tmp).write_text(json.dumps(spectrum, indent=1)))
    return DirectionSet.load(adapter_dir / DIRECTIONS_FILENAME)


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
        raise ValueError(
            f"{where}: LoRA update norm ||dW||_F = {norm:.3g}, expected > {MIN_UPDATE_NORM:g}: too "
            "small to define a direction (an untrained adapter? lora_B starts at zero)"
        )
    if energy is None:
        check_k_fits(k, core.shape[1], where)
    values_wanted = min(max(count_needed, SPECTRUM_LENGTH), min(core.shape))
    vectors, values = top_singular(core, values_wanted)
    chosen = choose_k(values, float(core.pow(2).sum()), k, energy, max_k)
    return vectors[:, :chosen], values


def check_k_fits(k: int, rank: int, where: str) -> None:
    """Refuse `k` directions from an update of total LoRA rank `rank` (stacked at `where`): only `rank` exist."""
    if k > rank:
        raise ValueError(
            f"{where}: k={k} directions asked, but the LoRA update there has total rank {rank}; expected k <= {rank}"
        )


def _captured(core, values, chosen) -> float:
    total = float(core.pow(2).sum())
    return float(values[:chosen].double().pow(2).sum() / total) if total > 0 else 0.0


def _layers_from_base_config(base: str | None) -> int | None:
    """The base model's layer count from its local `config.json` (None for a hub id or no local config)."""
    if not base or not (Path(base) / "config.json").is_file():
        return None
    config = json.loads((Path(base) / "config.json").read_text())
    return config_value(config.get("text_config", config), "num_layers")
