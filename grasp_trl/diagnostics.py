"""Reading a direction set: spectra, chosen k, energy captured, and how the bases align across layers."""

from __future__ import annotations

import torch

from .directions import DirectionSet


def principal_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |cos| between the subspaces spanned by two orthonormal bases (1.0: they share a direction)."""
    return float(torch.linalg.matrix_norm(a.double().T @ b.double(), ord=2))


def inspect_report(directions: DirectionSet) -> str:
    """A text report: per layer the leading singular values, chosen k, energy captured, and the principal
    |cos| with the next layer's basis (how consistently the factor sits across depth)."""
    meta = directions.metadata
    spectra = meta.get("singular_values", {})
    energy = meta.get("energy_captured", {})
    lines = [
        f"direction file: {directions.source}",
        f"hidden_size={directions.hidden_size} num_layers={directions.num_layers} scope={meta.get('scope', '?')} "
        f"sides={meta.get('sides', '?')} selection={meta.get('selection', '?')}",
        f"source adapter: {meta.get('source_adapter', '?')} (sha256 {str(meta.get('source_adapter_sha256', '?'))[:12]})",
        f"base model: {meta.get('base_model', '?')}   created: {meta.get('created', '?')}",
        "",
    ]
    if "global" in spectra:
        values = ", ".join(f"{v:.4g}" for v in spectra["global"][:8])
        lines.append(f"global spectrum: {values}   energy captured: {energy.get('global', float('nan')):.3f}")
        lines.append("")
    lines.append(f"{'layer':>5}  {'k':>2}  {'energy':>6}  {'|cos| next':>10}  top singular values")
    layers = sorted(directions.bases)
    for index, layer in enumerate(layers):
        nxt = layers[index + 1] if index + 1 < len(layers) else None
        cosine = f"{principal_cosine(directions.bases[layer], directions.bases[nxt]):10.3f}" if nxt is not None \
            else f"{'-':>10}"
        values = ", ".join(f"{v:.4g}" for v in spectra.get(str(layer), [])[:6])
        captured = energy.get(str(layer))
        captured = f"{captured:6.3f}" if captured is not None else f"{'-':>6}"
        lines.append(f"{layer:>5}  {directions.k(layer):>2}  {captured}  {cosine}  {values}")
    if not layers:
        lines.append("(empty: no layer is constrained)")
    return "\n".join(lines)
