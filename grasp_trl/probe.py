"""A judge-free drift probe: how far has fine-tuning moved the residual stream along the directions?

On prompts unrelated to the task, read every probed block's output residual `h_l` (a forward hook on the
block, the same place the `activations` projection acts), average its projection onto the layer's basis
`h_l U_l` over each prompt's tokens, and compare the fine-tuned model with its base. One sample per prompt:

    delta_i = mean_t(h_ft[i, t] U_l) - mean_t(h_base[i, t] U_l)          (a k_l-vector)

The reported shift is the mean of `delta_i` over prompts — signed when `k_l = 1` (positive: the model moved
along `+u`), its norm when `k_l > 1` (the basis of a subspace has no meaningful sign) — with a percentile
bootstrap confidence interval over prompts. `relative` divides by the base model's RMS residual norm at that
layer, so layers of different scale compare. No LLM judge, no generation: two forward passes per prompt.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .directions import DirectionSet
from .modules import block_output_hooks

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "neutral_prompts.jsonl"


def load_prompts(path: str | Path = DEFAULT_PROMPTS) -> list[str]:
    """Prompts from a JSONL file: one JSON object per line with a `prompt` or `text` string (or a bare JSON
    string). Blank lines are skipped. Raises ValueError naming the file and line on anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompts file not found" + (" (it is a directory)" if path.is_dir() else ""))
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f'{path}:{number}: not valid JSON ({exc.msg}); expected one object per line like {{"prompt": "..."}}'
            ) from exc
        text = row if isinstance(row, str) else row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{path}:{number}: expected a non-empty 'prompt' or 'text' string; found {json.dumps(row)[:80]}"
            )
        prompts.append(text)
    if not prompts:
        raise ValueError(f'{path}: no prompts (expected JSONL lines like {{"prompt": "..."}})')
    return prompts


@dataclass
class Readings:
    """Per layer: each prompt's token-mean projection `mean_t(h_l U_l)` (`n x k_l`), and the residual's mean
    squared norm per token (a scale for `relative`)."""

    projections: dict[int, torch.Tensor]
    mean_sq_norm: dict[int, float]


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = 128) -> list[list[int]]:
    """Token ids of each prompt (special tokens as the tokenizer adds them), truncated to `max_length`."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor wraps its tokenizer
    encoded = []
    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {index} ({prompt[:40]!r}) tokenizes to nothing")
        encoded.append(list(ids))
    unk = getattr(tokenizer, "unk_token_id", None)
    total = sum(len(ids) for ids in encoded)
    unknown = sum(ids.count(unk) for ids in encoded) if unk is not None else 0
    if unknown > total / 2:
        warnings.warn(
            f"{unknown}/{total} prompt tokens are the unknown token {tokenizer.unk_token!r}: the prompts "
            "do not suit this tokenizer, and the probe reads little more than position effects",
            stacklevel=2,
        )
    return encoded


def batches(encoded: Sequence[Sequence[int]], batch_size: int):
    """Yield `(input_ids, attention_mask)` batches, right-padded to the longest prompt of the whole set: one
    width for all batches, so the model sees few distinct shapes (each new shape costs set-up time)."""
    width = max(len(ids) for ids in encoded)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        yield ids, mask


@torch.no_grad()
def read_projections(
    model, encoded: Sequence[Sequence[int]], directions: DirectionSet, batch_size: int = 16
) -> Readings:
    """Run `model` on the tokenized prompts (eval mode, no grad) and read `h_l U_l` at every probed layer.

    Batches are right-padded and masked, so padding never changes a prompt's reading under a causal model.
    The model's train/eval mode is restored afterwards.
    """
    device = next(model.parameters()).device
    layers = sorted(directions.bases)
    bases = {l: directions.bases[l].to(device, torch.float32) for l in layers}
    sums = {l: [] for l in layers}
    sq_norm = {l: 0.0 for l in layers}
    captured: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        with block_output_hooks(model, lambda layer, hidden: captured.__setitem__(layer, hidden)):
            for ids, mask in batches(encoded, batch_size):
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
                weight = mask.to(device, torch.float32)[..., None]
                count = weight.sum(1)
                tokens += int(count.sum())
                for layer in layers:
                    hidden = captured[layer].float()
                    sums[layer].append(((hidden @ bases[layer]) * weight).sum(1).div(count).cpu())
                    sq_norm[layer] += float((hidden.pow(2).sum(-1, keepdim=True) * weight).sum())
    finally:
        model.train(was_training)
    return Readings({l: torch.cat(sums[l]).double() for l in layers}, {l: sq_norm[l] / max(tokens, 1) for l in layers})


def shift_statistic(deltas: torch.Tensor) -> torch.Tensor:
    """`deltas`: (..., n, k) per-prompt shifts -> (...) the signed mean (k = 1) or the norm of the mean."""
    mean = deltas.mean(-2)
    return mean[..., 0] if deltas.shape[-1] == 1 else mean.norm(dim=-1)


@dataclass
class LayerDrift:
    layer: int
    k: int
    shift: float  # signed (k = 1) or the norm of the mean shift vector (k > 1)
    ci_low: float
    ci_high: float
    relative: float  # shift / RMS norm of the base residual at this layer
    per_direction: list[float] = field(default_factory=list)  # mean shift along each basis column


@dataclass
class ProbeResult:
    layers: list[LayerDrift]
    num_prompts: int
    confidence: float

    def table(self) -> str:
        """A plain-text table, one row per layer."""
        pct = f"{100 * self.confidence:g}% CI"
        lines = [
            f"drift along the directions (fine-tuned - base), {self.num_prompts} prompts; k=1: signed shift "
            "of h.u, k>1: norm of the mean shift in the subspace",
            f"{'layer':>5}  {'k':>2}  {'shift':>10}  {pct:>23}  {'shift/rms(h)':>12}",
        ]
        for row in self.layers:
            ci = f"[{row.ci_low:+.4g}, {row.ci_high:+.4g}]"
            lines.append(f"{row.layer:>5}  {row.k:>2}  {row.shift:>+10.4g}  {ci:>23}  {row.relative:>+12.4g}")
        return "\n".join(lines)

    def as_dict(self) -> dict[int, float]:
        return {row.layer: row.shift for row in self.layers}


def compare(
    base: Readings, tuned: Readings, *, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> ProbeResult:
    """The per-layer shift of `tuned` over `base` (same prompts) with a percentile bootstrap CI over prompts."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    num_prompts = 0
    for layer, base_proj in base.projections.items():
        deltas = tuned.projections[layer] - base_proj
        num_prompts = deltas.shape[0]
        shift = float(shift_statistic(deltas))
        if n_bootstrap > 0 and num_prompts > 1:
            index = torch.randint(num_prompts, (n_bootstrap, num_prompts), generator=generator)
            samples = shift_statistic(deltas[index])
            tail = (1 - confidence) / 2
            low, high = (float(q) for q in torch.quantile(samples, torch.tensor([tail, 1 - tail], dtype=samples.dtype)))
        else:
            low = high = shift
        scale = base.mean_sq_norm[layer] ** 0.5
        rows.append(
            LayerDrift(
                layer,
                deltas.shape[1],
                shift,
                low,
                high,
                shift / scale if scale > 0 else 0.0,
                [float(v) for v in deltas.mean(0)],
            )
        )
    return ProbeResult(rows, num_prompts, confidence)


@contextlib.contextmanager
def _base_view(model):
    """Inside: `model` behaves as its base model (PEFT adapters disabled)."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError(f"{type(model).__name__} is not a PEFT model: pass base_model= to compare against")
    with model.disable_adapter():
        yield model


def drift_probe(
    model,
    tokenizer,
    prompts: Iterable[str],
    directions: DirectionSet,
    *,
    base_model=None,
    batch_size: int = 16,
    max_length: int = 128,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ProbeResult:
    """Per-layer drift of `model` along `directions` relative to `base_model` on `prompts`.

    `model` is a fine-tuned model; with `base_model=None` it must be a PEFT model and its base is read with
    the adapters disabled. `directions` is validated against the model first.
    """
    directions.validate_for(model)
    encoded = tokenize(tokenizer, list(prompts), max_length)
    tuned = read_projections(model, encoded, directions, batch_size)
    if base_model is None:
        with _base_view(model) as base_view:
            base = read_projections(base_view, encoded, directions, batch_size)
    else:
        directions.validate_for(base_model)
        base = read_projections(base_model, encoded, directions, batch_size)
    return compare(base, tuned, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
