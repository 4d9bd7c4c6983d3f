"""Figures for `grasp inspect --plot` and `grasp probe --plot` (matplotlib, no pyplot: no display needed).

Each function returns the `Figure` (tests read its axes and titles); `save_png` writes it atomically.
"""

from __future__ import annotations

from pathlib import Path

from .diagnostics import cosine_matrix
from .directions import DirectionSet, atomic_write
from .probe import ProbeResult

SPECTRUM_TITLE = "singular spectrum per layer"
ENERGY_TITLE = "energy captured by the chosen k"
COSINE_TITLE = "|cos| between layers' bases"
LENS_TITLE = "logit lens: promoted | suppressed tokens"
PROBE_TITLE = "drift along the directions (fine-tuned - base)"


def _figure(size):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # optional dependency
        raise ImportError("plots need matplotlib: pip install 'grasp-trl[plots]'") from exc
    return Figure(figsize=size, layout="constrained")


def save_png(figure, path: str | Path) -> Path:
    """Write `figure` as a PNG atomically; returns the path."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    return Path(path)


def _spectrum_panel(ax, directions: DirectionSet) -> None:
    spectra = directions.metadata.get("singular_values", {})
    ax.set_title(SPECTRUM_TITLE)
    if not spectra:
        ax.text(
            0.5,
            0.5,
            "no spectrum recorded\n(imported or hand-made directions)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
        return
    for key, values in sorted(spectra.items(), key=lambda kv: (kv[0] != "global", kv[0].zfill(6))):
        chosen = directions.k(int(key)) if key != "global" else next(iter(directions.bases.values())).shape[1]
        (line,) = ax.plot(range(1, len(values) + 1), values, marker=".", label=f"layer {key}")
        if 0 < chosen <= len(values):
            ax.plot([chosen], [values[chosen - 1]], marker="o", markersize=8, fillstyle="none", color=line.get_color())
    ax.set_xlabel("index (circle: chosen k)")
    ax.set_ylabel("singular value")
    ax.set_yscale("log")
    if len(spectra) <= 12:
        ax.legend(fontsize="x-small")


def _energy_panel(ax, directions: DirectionSet) -> None:
    energy = directions.metadata.get("energy_captured", {})
    ax.set_title(ENERGY_TITLE)
    if not energy:
        ax.text(0.5, 0.5, "no energy recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    keys = sorted(energy, key=lambda key: (key != "global", key.zfill(6)))
    bars = ax.bar(range(len(keys)), [energy[k] for k in keys])
    chosen = [directions.k(int(k)) if k != "global" else next(iter(directions.bases.values())).shape[1] for k in keys]
    if len(keys) <= 24:
        ax.bar_label(bars, [f"k={k}" for k in chosen], fontsize="x-small")
    ax.set_xticks(range(len(keys)), keys, fontsize="small")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of squared spectrum")
    ax.set_ylim(0, 1)


def _cosine_panel(figure, ax, directions: DirectionSet) -> None:
    layers, matrix = cosine_matrix(directions)
    ax.set_title(COSINE_TITLE)
    image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
    ticks = range(0, len(layers), max(1, len(layers) // 12))
    ax.set_xticks(list(ticks), [layers[i] for i in ticks])
    ax.set_yticks(list(ticks), [layers[i] for i in ticks])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    figure.colorbar(image, ax=ax, shrink=0.8)


def _lens_panel(ax, readout: dict[int, list[dict]], max_rows: int = 24) -> None:
    ax.set_title(LENS_TITLE)
    ax.set_axis_off()
    lines = []
    for layer, rows in readout.items():
        for index, row in enumerate(rows):
            promoted = " ".join(token for token, _ in row["promoted"])
            suppressed = " ".join(token for token, _ in row["suppressed"])
            lines.append(f"L{layer}.{index}: {promoted} | {suppressed}")
    if len(lines) > max_rows:
        lines = lines[:max_rows] + [f"... {len(lines) - max_rows} more"]
    ax.text(
        0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize="x-small", transform=ax.transAxes
    )


def plot_directions(directions: DirectionSet, readout: dict[int, list[dict]] | None = None):
    """Spectrum, energy and cross-layer |cos| panels; a fourth logit-lens panel when `readout` is given."""
    figure = _figure((12, 9) if readout else (15, 4.5))
    axes = figure.subplots(2, 2).flatten() if readout else figure.subplots(1, 3)
    _spectrum_panel(axes[0], directions)
    _energy_panel(axes[1], directions)
    _cosine_panel(figure, axes[2], directions)
    if readout:
        _lens_panel(axes[3], readout)
    title = directions.path.name if directions.path else directions.source
    figure.suptitle(
        f"{title}: hidden_size={directions.hidden_size}, {len(directions.bases)}/{directions.num_layers} layers"
    )
    return figure


def plot_probe(result: ProbeResult):
    """The per-layer shift with its bootstrap confidence interval as error bars."""
    figure = _figure((7, 4))
    ax = figure.subplots()
    layers = [row.layer for row in result.layers]
    shifts = [row.shift for row in result.layers]
    errors = [[row.shift - row.ci_low for row in result.layers], [row.ci_high - row.shift for row in result.layers]]
    ax.errorbar(layers, shifts, yerr=errors, marker="o", capsize=3)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_title(PROBE_TITLE)
    ax.set_xticks(layers[:: max(1, len(layers) // 16)])
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean shift of h.U ({100 * result.confidence:g}% CI)")
    return figure
