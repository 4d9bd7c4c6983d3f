"""Direction importers (`grasp_trl.importers`): layer tensors and layer dicts round-trip, bases are orthonormalised,
pickles and bad content are refused."""

import pickle

import pytest
import torch

from grasp_trl.directions import DirectionFileError, DirectionSet
from grasp_trl.importers import from_layer_tensor, import_directions, orthonormal_basis

D, L = 32, 3


def test_layer_tensor_round_trip_maps_row_l_plus_1_to_block_l(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(L + 1, D, generator=generator) * 7
    for path, save in [
        (tmp_path / "persona.pt", lambda p: torch.save(tensor, p)),
        (
            tmp_path / "persona.safetensors",
            lambda p: __import__("safetensors.torch").torch.save_file({"vectors": tensor}, p),
        ),
    ]:
        save(path)
        directions = import_directions(path)
        assert directions.num_layers == L and sorted(directions.bases) == list(range(L))
        for layer in range(L):
            torch.testing.assert_close(directions.bases[layer][:, 0], tensor[layer + 1] / tensor[layer + 1].norm())
        assert directions.metadata["import_format"] == "layer-tensor"
        reloaded = DirectionSet.load(directions.save(tmp_path / "out.safetensors"))
        for layer in range(L):
            torch.testing.assert_close(reloaded.bases[layer], directions.bases[layer])
    assert sorted(import_directions(tmp_path / "persona.pt", layers=[2]).bases) == [2]
    with pytest.raises(DirectionFileError, match="num_layers=5"):
        import_directions(tmp_path / "persona.pt", num_layers=5)


def test_layer_dict_round_trip_and_orthonormalisation(tmp_path):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    vectors = {"3": torch.randn(D, generator=generator), "layers.5": torch.randn(2, D, generator=generator)}
    save_file(vectors, tmp_path / "vectors.safetensors")
    directions = import_directions(tmp_path / "vectors.safetensors", num_layers=8)
    assert directions.num_layers == 8 and sorted(directions.bases) == [3, 5]
    torch.testing.assert_close(directions.bases[3][:, 0], vectors["3"] / vectors["3"].norm())
    basis = directions.bases[5]
    torch.testing.assert_close(basis.T @ basis, torch.eye(2), atol=1e-6, rtol=0)
    # same span, first column along the first vector (sign kept)
    rows = vectors["layers.5"]
    torch.testing.assert_close(basis @ (basis.T @ rows.T), rows.T, atol=1e-5, rtol=1e-5)
    assert float(basis[:, 0] @ rows[0]) == pytest.approx(float(rows[0].norm()), rel=1e-5)
    reloaded = DirectionSet.load(directions.save(tmp_path / "out.safetensors"))
    torch.testing.assert_close(reloaded.bases[5], basis)
    inferred = import_directions(tmp_path / "vectors.safetensors")
    assert inferred.num_layers == 6 and inferred.metadata["num_layers_inferred"]
    torch.save({12: torch.randn(D)}, tmp_path / "dict.pt")  # int keys through torch.load(weights_only=True)
    assert sorted(import_directions(tmp_path / "dict.pt").bases) == [12]


class NotATensor:
    pass


def test_importers_refuse_pickle_and_bad_content(tmp_path):
    torch.save({"vectors": NotATensor()}, tmp_path / "object.pt")
    with open(tmp_path / "raw.pkl", "wb") as handle:
        pickle.dump({"vectors": NotATensor()}, handle)
    for name in ("object.pt", "raw.pkl"):
        with pytest.raises(DirectionFileError, match="refused.*weights_only=True"):
            import_directions(tmp_path / name)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DirectionFileError, match="not a readable safetensors file"):
        import_directions(tmp_path / "corrupt.safetensors")
    with pytest.raises(DirectionFileError, match="zero vector"):
        from_layer_tensor(torch.zeros(L + 1, D))
    with pytest.raises(DirectionFileError, match="linearly dependent"):
        orthonormal_basis(torch.stack([torch.ones(D), 2 * torch.ones(D)]), "x")
    with pytest.raises(DirectionFileError, match="shape"):
        from_layer_tensor(torch.randn(D))
    torch.save({"layer_three": torch.randn(D), "x": torch.randn(D)}, tmp_path / "keys.pt")
    with pytest.raises(DirectionFileError, match="expected a single layer tensor"):
        import_directions(tmp_path / "keys.pt")
    with pytest.raises(FileNotFoundError):
        import_directions(tmp_path / "missing.pt")
