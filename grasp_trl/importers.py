"""Import directions found elsewhere (persona vectors, steering vectors, probes) into a `DirectionSet`.

Two layouts:

* **layer tensor** — one tensor `[L+1, d]` (or `[L+1, k, d]` for k vectors per layer), as persona-vector style
  tools save them: row `0` is the token embeddings (the stream before block 0), row `l+1` is the residual
  stream after block `l` (`hidden_states[l+1]` in transformers). Row `l+1` becomes GRASP layer `l`; row 0 is
  dropped (GRASP hooks block outputs, and no block writes the embedding stream). `num_layers = L`.
* **layer dict** — a safetensors file `{layer: vector}` with keys `"12"`, `"layer.12"` or `"layers.12"`
  (the block index `l`, same convention as GRASP: the stream after block `l`) and values `(d,)` or `(k, d)`.

Per layer the vectors are orthonormalised in order (Gram-Schmidt via QR with the signs fixed so the first
column points along the first vector; a single vector is just normalised), so a probe's `+` sign keeps its
meaning. Files are read with safetensors, or with `torch.load(weights_only=True)`; anything needing pickle
beyond plain tensors is refused.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch

from .directions import DirectionFileError, DirectionSet, sha256_of

Format = Literal["auto", "layer-tensor", "layer-dict"]
FORMATS = ("auto", "layer-tensor", "layer-dict")
INDEX_MAPPING = "layer tensor row l+1 = residual stream after block l (row 0 = embeddings, dropped)"
_LAYER_KEY = re.compile(r"^(?:layers?\.)?(\d+)$")
DEPENDENT_TOL = 1e-6  # |R_ii| / ||v_i|| below this: the vectors of a layer are linearly dependent


def orthonormal_basis(vectors: torch.Tensor, where: str) -> torch.Tensor:
    """`vectors` (`k x d`, rows) -> `d x k` orthonormal columns spanning them, column i along the part of
    row i orthogonal to rows < i (positive sign). Raises for zero, non-finite or dependent vectors."""
    vectors = vectors.detach().to("cpu", torch.float64)
    if not torch.isfinite(vectors).all():
        raise DirectionFileError(f"{where}: contains NaN or Inf")
    norms = vectors.norm(dim=1)
    if (norms == 0).any():
        raise DirectionFileError(f"{where}: zero vector; a direction needs a non-zero vector")
    q, r = torch.linalg.qr(vectors.T)
    diag = torch.diagonal(r)
    if (diag.abs() < DEPENDENT_TOL * norms).any():
        raise DirectionFileError(f"{where}: the {vectors.shape[0]} vectors are linearly dependent")
    return (q * diag.sign()).float()


def _load_tensors(path: Path):
    """A tensor or a `{name: tensor}` dict from a safetensors file or a weights-only torch file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found" + (" (it is a directory)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise DirectionFileError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DirectionFileError(
            f"{path}: refused: the file holds pickled objects other than tensors and GRASP "
            "only loads with weights_only=True; save the vectors as a plain tensor or as "
            "safetensors"
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file at all, ...
        raise DirectionFileError(f"{path}: not a readable torch tensor file ({str(exc).splitlines()[0]})") from exc


def _as_rows(value, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise DirectionFileError(f"{where}: expected a tensor, found {type(value).__name__}")
    if value.ndim == 1:
        return value[None]
    if value.ndim == 2:
        return value
    raise DirectionFileError(
        f"{where}: expected a vector (d,) or a stack of vectors (k, d); found shape {tuple(value.shape)}"
    )


def _metadata(path: Path, fmt: str, **extra) -> dict:
    return {
        "scope": "imported",
        "import_format": fmt,
        "source_file": str(path.resolve()),
        "source_sha256": sha256_of(path),
        **extra,
    }


def from_layer_tensor(
    tensor: torch.Tensor,
    *,
    layers: Iterable[int] | None = None,
    num_layers: int | None = None,
    where: str = "<tensor>",
    metadata: dict | None = None,
) -> DirectionSet:
    """`[L+1, d]` or `[L+1, k, d]` (row 0 = embeddings, row l+1 = after block l) -> DirectionSet over L blocks."""
    if tensor.ndim not in (2, 3) or tensor.shape[0] < 2:
        raise DirectionFileError(
            f"{where}: expected a layer tensor of shape [L+1, d] or [L+1, k, d] with L >= 1; "
            f"found {tuple(tensor.shape)}"
        )
    found = tensor.shape[0] - 1
    if num_layers is not None and num_layers != found:
        raise DirectionFileError(
            f"{where}: {tensor.shape[0]} rows = embeddings + {found} blocks, but the model has "
            f"num_layers={num_layers} (expected {num_layers + 1} rows)"
        )
    wanted = range(found) if layers is None else sorted(set(int(l) for l in layers))
    bases = {}
    for layer in wanted:
        if not 0 <= layer < found:
            raise DirectionFileError(f"{where}: layer {layer} out of range for {found} blocks")
        bases[layer] = orthonormal_basis(
            _as_rows(tensor[layer + 1], where), f"{where}: row {layer + 1} (block {layer})"
        )
    meta = {"index_mapping": INDEX_MAPPING, **(metadata or {}), "hidden_size": tensor.shape[-1]}
    return DirectionSet(bases, found, meta, source=where)


def from_layer_dict(
    vectors: dict,
    *,
    num_layers: int | None = None,
    layers: Iterable[int] | None = None,
    where: str = "<dict>",
    metadata: dict | None = None,
) -> DirectionSet:
    """`{layer: (d,) or (k, d)}` (layer = block index, keys like 12 / "12" / "layers.12") -> DirectionSet."""
    parsed = {}
    for key, value in vectors.items():
        match = _LAYER_KEY.match(str(key))
        if not match:
            raise DirectionFileError(
                f"{where}: key {key!r} is not a layer index; expected keys like '12', 'layer.12' or 'layers.12'"
            )
        layer = int(match.group(1))
        if layer in parsed:
            raise DirectionFileError(f"{where}: layer {layer} appears twice")
        parsed[layer] = _as_rows(value, f"{where}: {key}")
    if not parsed:
        raise DirectionFileError(f"{where}: no vectors")
    meta = dict(metadata or {})
    if num_layers is None:
        num_layers = max(parsed) + 1
        meta["num_layers_inferred"] = True
    if layers is not None:
        keep = set(int(l) for l in layers)
        parsed = {l: v for l, v in parsed.items() if l in keep}
    bases = {l: orthonormal_basis(v, f"{where}: layer {l}") for l, v in parsed.items()}
    sizes = {b.shape[0] for b in bases.values()}
    if len(sizes) > 1:
        raise DirectionFileError(f"{where}: vectors disagree on hidden size: {sorted(sizes)}")
    return DirectionSet(bases, num_layers, {**meta, "hidden_size": sizes.pop() if sizes else None}, source=where)


def import_directions(
    path: str | Path, fmt: Format = "auto", *, num_layers: int | None = None, layers: Iterable[int] | None = None
) -> DirectionSet:
    """Read a layer tensor or layer dict file into a `DirectionSet` (see the module docstring for layouts).

    `auto`: a file holding a single tensor (torch file, or safetensors with one non-numeric key) is a layer
    tensor; a mapping whose keys are layer indices is a layer dict.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, found {fmt!r}")
    path = Path(path)
    loaded = _load_tensors(path)
    where = str(path)
    if isinstance(loaded, dict):
        numeric = all(_LAYER_KEY.match(str(k)) for k in loaded)
        if fmt == "layer-tensor" or (fmt == "auto" and not numeric):
            if len(loaded) != 1:
                raise DirectionFileError(
                    f"{path}: expected a single layer tensor [L+1, d]; found {len(loaded)} "
                    f"entries ({', '.join(map(str, list(loaded)[:5]))}); for a "
                    "{layer: vector} file use keys like '12' or 'layers.12'"
                )
            loaded = next(iter(loaded.values()))
        else:
            return from_layer_dict(
                loaded, num_layers=num_layers, layers=layers, where=where, metadata=_metadata(path, "layer-dict")
            )
    if not isinstance(loaded, torch.Tensor):
        raise DirectionFileError(
            f"{path}: expected a tensor or a {{layer: vector}} mapping; found {type(loaded).__name__}"
        )
    if fmt == "layer-dict":
        raise DirectionFileError(
            f"{path}: holds a single tensor, not a {{layer: vector}} mapping; use --format layer-tensor"
        )
    return from_layer_tensor(
        loaded, layers=layers, num_layers=num_layers, where=where, metadata=_metadata(path, "layer-tensor")
    )
