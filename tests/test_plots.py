"""`grasp inspect` / probe figures (`grasp_trl.plots`): the expected panels, saved as PNG."""

import torch

from diagnostics_utils import D, L, along, planted_adapter
from grasp_trl.importers import from_layer_tensor
from grasp_trl.probe import drift_probe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def titles(figure):
    return [ax.get_title() for ax in figure.axes if ax.get_title()]


def test_inspect_plot_has_the_expected_panels_and_is_a_png(identified, tmp_path, tokenizer):
    from matplotlib.image import imread

    from grasp_trl import plots

    figure = plots.plot_directions(identified)
    assert titles(figure) == [plots.SPECTRUM_TITLE, plots.ENERGY_TITLE, plots.COSINE_TITLE]
    assert len(figure.axes) == 4  # + the heatmap's colorbar
    path = plots.save_png(figure, tmp_path / "inspect.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and imread(path).shape[2] in (3, 4)
    readout = {0: [{"promoted": [("w001", 1.0)], "suppressed": [("w002", -1.0)]}]}
    with_lens = plots.plot_directions(identified, readout)
    assert titles(with_lens) == [plots.SPECTRUM_TITLE, plots.ENERGY_TITLE, plots.COSINE_TITLE, plots.LENS_TITLE]
    assert "w001" in with_lens.axes[3].texts[0].get_text()
    imported = from_layer_tensor(torch.randn(L + 1, D))  # no spectrum recorded: the panel says so
    assert "no spectrum" in plots.plot_directions(imported).axes[0].texts[0].get_text()


def test_probe_plot(tokenizer, prompts, u, tmp_path):
    from grasp_trl import plots

    result = drift_probe(planted_adapter(tokenizer, prompts, u), tokenizer, prompts, along(u), n_bootstrap=50)
    figure = plots.plot_probe(result)
    assert titles(figure) == [plots.PROBE_TITLE]
    assert plots.save_png(figure, tmp_path / "probe.png").read_bytes()[:8] == PNG_MAGIC
