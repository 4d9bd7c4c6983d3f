"""`DirectionSet`: the per-layer orthonormal bases GRASP projects out, and their safetensors file format.

File format (DESIGN §5): one `.safetensors` file with tensors `layers.{l}.basis` (`d x k_l`, fp32) and a
single JSON metadata entry `grasp` holding format version, hidden size, number of layers, provenance (base
model, source adapter and its sha256), `k`, scope, sides, per-layer singular values, the module
classification used, creation time and package version. Writes are atomic (temp file + `os.replace`), so a
failed save never clobbers an existing file; loading validates everything and names the file in every error.

A `DirectionSet` is a value, like a fitted eraser: built once (by identification, an importer, `random` or
`load`), validated in its constructor, never changed afterwards. Variants are new sets (`restricted_to`,
`with_metadata`). Where it came from is explicit: `source` names it in messages, `path` is the file it was
loaded from (None when it was never a file), `file_bytes` the exact bytes read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

FORMAT_VERSION = 1
ORTHONORMAL_TOL = 1e-4  # past this, load re-orthonormalises with a warning
DEGENERATE_TOL = 0.5  # past this (||U^T U - I||), the basis is not a basis: error
_KEY = re.compile(r"^layers\.(\d+)\.basis$")
_WARNED_FOREIGN: set[tuple[str, str]] = set()  # (set's source, model): the foreign-base warning, once per pair


class DirectionFileError(ValueError):
    """A direction file is missing, corrupt, or does not fit the model it is applied to."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("grasp-trl")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output(path: str | os.PathLike, flag: str, *, reading=(), overwrite: bool = False) -> Path:
    """Refuse to write `path` (given as `flag`; derived from another path when `flag` is empty) where that would
    destroy something: a file the command is reading (`reading`; never allowed, not even with `overwrite`), or
    an existing file unless `overwrite`. Every command that writes a user-named file calls this before any work,
    so a refusal costs nothing and no input or record of a past run is lost."""
    path = Path(path)
    target, named = path.resolve(), f"{flag} {path}" if flag else str(path)
    for source in reading:
        if target == Path(source).resolve():
            raise FileExistsError(f"{named}: is the input {source} this command reads; expected a new path")
    if path.is_dir():
        raise IsADirectoryError(f"{named}: is a directory; expected a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{named}: already exists; expected a new path (pass --overwrite to replace it)")
    return path


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it over `path`. The file gets the
    permissions an ordinary write would (0666 less the umask), not `mkstemp`'s private 0600. A directory that
    cannot be created or written is reported under `path`, not the hidden temp file's name."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OSError(f"{path}: cannot write there ({exc.strerror}: {exc.filename})") from exc
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # after `write`: a writer may replace the file rather than fill it
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def orthonormality_error(basis: torch.Tensor) -> float:
    basis = basis.double()
    return float((basis.T @ basis - torch.eye(basis.shape[1], dtype=basis.dtype)).abs().max())


class DirectionSet:
    """Per-layer orthonormal bases `U_l` (`d x k_l`) of the spurious factor, in residual-stream space.

    `bases` maps a block index `l` (the residual stream *after* block `l`) to a tensor with orthonormal
    columns; layers that are absent are not constrained. Signs are arbitrary: the subspace is the object.
    Immutable: `bases` and `metadata` are read-only mappings and attributes cannot be set.
    """

    def __init__(
        self,
        bases: Mapping[int, torch.Tensor],
        num_layers: int,
        metadata: Mapping[str, Any] | None = None,
        *,
        source: str = "<in memory>",
        path: str | os.PathLike | None = None,
        file_bytes: bytes | None = None,
    ):
        set_ = functools.partial(object.__setattr__, self)
        set_("num_layers", int(num_layers))
        set_("source", source)
        set_("path", Path(path) if path is not None else None)
        set_("_file_bytes", file_bytes)  # the bytes `load` parsed: what checkpoints record (see `file_bytes`)
        metadata = dict(metadata or {})
        checked: dict[int, torch.Tensor] = {}
        sizes = set()
        for layer, basis in sorted(bases.items()):
            layer = int(layer)
            basis = torch.as_tensor(basis).detach().to("cpu", torch.float32)
            if basis.ndim == 1:
                basis = basis[:, None]
            where = f"{source}: layers.{layer}.basis"
            if not 0 <= layer < self.num_layers:
                raise DirectionFileError(f"{where}: layer index {layer} out of range for num_layers={self.num_layers}")
            if basis.ndim != 2 or basis.shape[1] == 0 or basis.shape[1] >= basis.shape[0]:
                raise DirectionFileError(
                    f"{where}: expected shape (hidden_size, k) with 1 <= k < hidden_size "
                    f"(k = hidden_size would project out the whole stream), found "
                    f"{tuple(basis.shape)}"
                )
            if not torch.isfinite(basis).all():
                raise DirectionFileError(f"{where}: contains NaN or Inf")
            error = orthonormality_error(basis)
            if error > DEGENERATE_TOL:
                raise DirectionFileError(
                    f"{where}: columns are not orthonormal (max |U^T U - I| = {error:.3g}); "
                    "expected an orthonormal basis"
                )
            if error > ORTHONORMAL_TOL:
                warnings.warn(
                    f"{where}: max |U^T U - I| = {error:.3g} > {ORTHONORMAL_TOL}; re-orthonormalising", stacklevel=2
                )
                basis = torch.linalg.qr(basis.double())[0].float()
            sizes.add(basis.shape[0])
            checked[layer] = basis.contiguous()
        if len(sizes) > 1:
            raise DirectionFileError(f"{source}: bases disagree on hidden size: {sorted(sizes)}")
        declared = metadata.get("hidden_size")
        if sizes and declared is not None and int(declared) not in sizes:
            raise DirectionFileError(f"{source}: metadata hidden_size={declared} but bases have {sizes.pop()} rows")
        set_("bases", MappingProxyType(checked))
        set_("metadata", MappingProxyType(metadata))

    def __setattr__(self, name, value):
        raise AttributeError(f"DirectionSet is immutable (setting {name!r}); build a new set, e.g. with_metadata()")

    # ----------------------------------------------------------------------------------------------- views
    @property
    def hidden_size(self) -> int | None:
        if self.bases:
            return next(iter(self.bases.values())).shape[0]
        declared = self.metadata.get("hidden_size")
        return int(declared) if declared is not None else None

    @property
    def is_empty(self) -> bool:
        return not self.bases

    def k(self, layer: int) -> int:
        return self.bases[layer].shape[1] if layer in self.bases else 0

    @classmethod
    def random(cls, hidden_size: int, num_layers: int, k: int, *, seed: int = 0, layers=None) -> DirectionSet:
        """Random orthonormal bases (`hidden_size x k`, QR of a float64 Gaussian from `seed`) for `layers` (all by
        default): the control that asks whether projecting *any* directions changes a result."""
        generator = torch.Generator().manual_seed(seed)
        layers = range(num_layers) if layers is None else layers
        bases = {
            l: torch.linalg.qr(torch.randn(hidden_size, k, generator=generator, dtype=torch.float64))[0].float()
            for l in layers
        }
        return cls(
            bases,
            num_layers,
            {"hidden_size": hidden_size, "source": "random", "seed": seed},
            source=f"random directions (seed {seed})",
        )

    def with_metadata(self, **entries) -> DirectionSet:
        """A new in-memory set with the same bases and `entries` added to (or replacing) the metadata."""
        return DirectionSet(self.bases, self.num_layers, {**self.metadata, **entries}, source=self.source)

    def restricted_to(self, layers) -> DirectionSet:
        """The same set with only `layers` kept (the `grasp_layers` option)."""
        layers = set(int(l) for l in layers)
        bad = sorted(l for l in layers if not 0 <= l < self.num_layers)
        if bad:
            raise DirectionFileError(f"grasp_layers: {bad} out of range for a model with {self.num_layers} layers")
        kept = {l: b for l, b in self.bases.items() if l in layers}
        if not kept and self.bases:
            raise DirectionFileError(
                f"grasp_layers: {sorted(layers)} keeps none of the layers {sorted(self.bases)} "
                f"that {self.source} has directions for; nothing would be projected"
            )
        return DirectionSet(kept, self.num_layers, {**self.metadata, "layers_kept": sorted(layers)}, source=self.source)

    def __repr__(self) -> str:
        ks = {l: b.shape[1] for l, b in self.bases.items()}
        return f"DirectionSet(hidden_size={self.hidden_size}, num_layers={self.num_layers}, k={ks})"

    # -------------------------------------------------------------------------------------------- checking
    def validate_for(self, model) -> None:
        """Raise `DirectionFileError` unless hidden size and layer count match `model`'s config."""
        from .modules import hidden_size, num_hidden_layers

        model_d, model_l = hidden_size(model), num_hidden_layers(model)
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        if self.hidden_size is not None and self.hidden_size != model_d:
            raise DirectionFileError(
                f"{self.source}: direction file has hidden_size={self.hidden_size}, "
                f"model {name} has hidden_size={model_d}"
            )
        if self.num_layers != model_l:
            raise DirectionFileError(
                f"{self.source}: direction file has num_layers={self.num_layers}, "
                f"model {name} has num_hidden_layers={model_l}"
            )
        base = self.metadata.get("base_model")
        if base and name and not _same_model(base, name) and (self.source, name) not in _WARNED_FOREIGN:
            _WARNED_FOREIGN.add((self.source, name))  # once per set and model: several steps of one command validate
            warnings.warn(
                f"{self.source}: identified on base model {base}, applied to model {name}: directions of "
                "one base model mean nothing in another (same shapes only)",
                stacklevel=2,
            )

    # ----------------------------------------------------------------------------------------------- files
    @property
    def file_bytes(self) -> bytes:
        """The set as a direction file's bytes: those `load` read (so a file rewritten on disk later changes
        nothing: the trainers write checkpoints and outputs from these), else a fresh serialisation."""
        if self._file_bytes is None:
            object.__setattr__(self, "_file_bytes", self._serialise())  # a cache: the value does not change
        return self._file_bytes

    @property
    def sha256(self) -> str:
        """sha256 of `file_bytes`: the hash of the file exactly as it was read (and as checkpoints record it)."""
        return hashlib.sha256(self.file_bytes).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the set atomically as safetensors + JSON metadata; returns the path."""
        from safetensors.torch import save_file

        tensors, metadata = self._payload()
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return Path(path)

    def write_recorded(self, path: str | os.PathLike) -> Path:
        """Write `file_bytes` (the file as it was read) atomically to `path`: checkpoints and outputs."""
        data = self.file_bytes
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        return Path(path)

    def _serialise(self) -> bytes:
        from safetensors.torch import save

        tensors, metadata = self._payload()
        return save(tensors, metadata=metadata)

    def _payload(self) -> tuple[dict, dict]:
        """The file's tensors and its safetensors metadata (the `grasp` JSON entry)."""
        meta = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "package_version": package_version(),
            **self.metadata,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "k": {str(l): b.shape[1] for l, b in self.bases.items()},
        }
        # clone: layers of a global set may share one tensor, which safetensors refuses to write twice
        tensors = {f"layers.{l}.basis": b.contiguous().clone() for l, b in self.bases.items()}
        return tensors, {"grasp": json.dumps(meta)}

    @classmethod
    def load(cls, path: str | os.PathLike) -> DirectionSet:
        """Read and validate a direction file. Every failure is a `DirectionFileError` naming the file.

        The file is read once, and its bytes are kept (`file_bytes`, `sha256`): what was loaded is what is
        recorded, whatever happens to the file on disk afterwards."""
        from safetensors.torch import load

        path = Path(path)
        if not path.is_file():
            raise DirectionFileError(
                f"{path}: direction file not found" + (" (it is a directory)" if path.is_dir() else "")
            )
        data = path.read_bytes()
        try:
            header_length = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_length])
            raw_meta = (header.get("__metadata__") or {}).get("grasp")
            tensors = load(data)
        except Exception as exc:  # safetensors raises several types for truncated/garbled files
            raise DirectionFileError(f"{path}: not a readable safetensors file ({exc})") from exc
        if raw_meta is None:
            raise DirectionFileError(f"{path}: no 'grasp' metadata entry: not a GRASP direction file")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as exc:
            raise DirectionFileError(f"{path}: 'grasp' metadata is not valid JSON ({exc})") from exc
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise DirectionFileError(f"{path}: format_version {version!r}, this grasp-trl reads {FORMAT_VERSION}")
        if "num_layers" not in meta:
            raise DirectionFileError(f"{path}: metadata lacks num_layers")
        bases = {}
        for key, tensor in tensors.items():
            match = _KEY.match(key)
            if not match:
                raise DirectionFileError(f"{path}: unexpected tensor {key!r}; expected 'layers.<l>.basis'")
            bases[int(match.group(1))] = tensor
        return cls(bases, int(meta["num_layers"]), meta, source=str(path), path=path, file_bytes=data)


def _same_model(a: str, b: str) -> bool:
    """Whether two model names (hub ids or local directories) plausibly name the same model: equal after
    resolving local paths, or the same final path component (a hub id and its local snapshot)."""

    def norm(name: str) -> str:
        return str(Path(name).resolve()) if Path(name).exists() else name.rstrip("/")

    a, b = norm(a), norm(b)
    return a == b or Path(a).name == Path(b).name
