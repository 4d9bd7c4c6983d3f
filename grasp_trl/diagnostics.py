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
        f"imported from: {meta['source_file']} ({meta.get('import_format', '?')}, sha256 "
        f"{str(meta.get('source_sha256', '?'))[:12]}); {meta.get('index_mapping', 'keys = block indices')}"
        if "source_file" in meta
        else f"source adapter: {meta.get('source_adapter', '?')} "
        f"(sha256 {str(meta.get('source_adapter_sha256', '?'))[:12]})",
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
        cosine = (
            f"{principal_cosine(directions.bases[layer], directions.bases[nxt]):10.3f}"
            if nxt is not None
            else f"{'-':>10}"
        )
        values = ", ".join(f"{v:.4g}" for v in spectra.get(str(layer), [])[:6])
        captured = energy.get(str(layer))
        captured = f"{captured:6.3f}" if captured is not None else f"{'-':>6}"
        lines.append(f"{layer:>5}  {directions.k(layer):>2}  {captured}  {cosine}  {values}")
    if not layers:
        lines.append("(empty: no layer is constrained)")
    return "\n".join(lines)


def cosine_matrix(directions: DirectionSet) -> tuple[list[int], torch.Tensor]:
    """The layers and the matrix of principal |cos| between every pair of layers' bases."""
    layers = sorted(directions.bases)
    matrix = torch.ones(len(layers), len(layers))
    for i, a in enumerate(layers):
        for j in range(i + 1, len(layers)):
            matrix[i, j] = matrix[j, i] = principal_cosine(directions.bases[a], directions.bases[layers[j]])
    return layers, matrix


def final_norm(model):
    """The final norm applied before the unembedding (`model.norm`, `ln_f`, `final_layer_norm`, ...)."""
    from .modules import block_index

    candidates = [
        module
        for name, module in model.named_modules()
        if block_index(name) is None
        and name.split(".")[-1] in {"norm", "ln_f", "final_layer_norm", "final_norm", "norm_f"}
    ]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: no final norm found (looked for norm, ln_f, final_layer_norm)")
    return candidates[-1]


@torch.no_grad()
def logit_lens(model, tokenizer, directions: DirectionSet, top: int = 5) -> dict[int, list[dict]]:
    """Per layer and basis column `u`: the tokens `u` most promotes and most suppresses when read out through
    the base model's final norm and unembedding.

    The readout is the direction's own effect, with the norm's and unembedding's constant offsets removed:
    `unembed(norm(u) - norm(0)) - unembed(0)`. It captures RMSNorm/LayerNorm gains and LayerNorm's centring;
    the norm's overall scale does not change the ranking. Signs of identified bases are arbitrary, so
    "promoted" and "suppressed" swap under `u -> -u`; for imported vectors the sign is the source's.
    """
    directions.validate_for(model)
    norm = final_norm(model)
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise ValueError(f"{type(model).__name__}: no output embeddings (lm_head) to read directions through")
    param = next(unembed.parameters())
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    result = {}
    for layer in sorted(directions.bases):
        basis = directions.bases[layer].T.to(param.device, param.dtype)  # k x d
        zero = torch.zeros_like(basis[:1])
        logits = (unembed(norm(basis) - norm(zero)) - unembed(zero)).float()
        rows = []
        for column in logits:
            order = torch.argsort(column, descending=True)

            def pick(ids, column=column):
                return [(tokenizer.convert_ids_to_tokens(int(i)), float(column[i])) for i in ids]

            rows.append({"promoted": pick(order[:top]), "suppressed": pick(order.flip(0)[:top])})
        result[layer] = rows
    return result


def logit_lens_report(readout: dict[int, list[dict]]) -> str:
    """Text table of `logit_lens` output: one line per layer and direction."""
    lines = [
        "logit lens (final norm + unembedding of the base model; basis signs are arbitrary):",
        f"{'layer':>5}  {'dir':>3}  promotes | suppresses",
    ]
    for layer, rows in readout.items():
        for index, row in enumerate(rows):
            promoted = " ".join(token for token, _ in row["promoted"])
            suppressed = " ".join(token for token, _ in row["suppressed"])
            lines.append(f"{layer:>5}  {index:>3}  {promoted} | {suppressed}")
    return "\n".join(lines)
