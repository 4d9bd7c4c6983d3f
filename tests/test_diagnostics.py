"""Direction diagnostics (`grasp_trl.diagnostics`): the cosine matrix between layers' bases and the logit lens."""

import pytest
import torch

from grasp_trl.diagnostics import cosine_matrix, logit_lens, principal_cosine
from grasp_trl.directions import DirectionSet
from grasp_trl.tiny import build_model


def test_cosine_matrix_is_symmetric_with_unit_diagonal(identified):
    layers, matrix = cosine_matrix(identified)
    assert layers == sorted(identified.bases)
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(torch.diagonal(matrix), torch.ones(len(layers)))
    assert matrix[0, 1] == pytest.approx(principal_cosine(identified.bases[0], identified.bases[1]))
    assert float(matrix.max()) <= 1 + 1e-6


def test_logit_lens_reads_a_direction_through_final_norm_and_unembedding(tokenizer):
    model = build_model("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=2, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a non-trivial final norm gain, so the readout must go through it
        model.model.norm.weight.copy_(torch.rand(64, generator=generator) + 0.5)
    unembed, gain = model.lm_head.weight.detach(), model.model.norm.weight.detach()
    for promote, suppress in [(10, 20), (50, 7), (90, 33)]:
        target = (unembed[promote] - unembed[suppress]) / gain  # norm(u) is proportional to gain * u
        directions = DirectionSet({0: target / target.norm()}, 2)
        readout = logit_lens(model, tokenizer, directions, top=3)[0][0]
        assert readout["promoted"][0][0] == tokenizer.convert_ids_to_tokens(promote)
        assert readout["suppressed"][0][0] == tokenizer.convert_ids_to_tokens(suppress)
        assert readout["promoted"][0][1] > readout["promoted"][1][1]
