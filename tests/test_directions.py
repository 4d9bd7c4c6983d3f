"""Direction files: round trip, validation, clear errors, atomic writes."""

import json

import pytest
import torch

from grasp_trl.directions import DirectionFileError, DirectionSet
from testing_utils import lora_model


def test_round_trip_keeps_bases_and_metadata(tmp_path):
    directions = DirectionSet.random(32, 3, k=2, layers=[0, 2]).with_metadata(
        scope="per_layer", singular_values={"0": [3.0, 1.0]}
    )
    path = directions.save(tmp_path / "d.safetensors")
    loaded = DirectionSet.load(path)
    assert sorted(loaded.bases) == [0, 2] and loaded.num_layers == 3 and loaded.hidden_size == 32
    for layer in (0, 2):
        assert torch.equal(loaded.bases[layer], directions.bases[layer])
    for key in ("format_version", "created", "package_version", "scope", "singular_values", "k"):
        assert key in loaded.metadata
    assert loaded.metadata["k"] == {"0": 2, "2": 2}


def test_validate_for_names_both_sides(tmp_path):
    model = lora_model(num_layers=3)
    DirectionSet.random(32, 3, 1).validate_for(model)
    with pytest.raises(DirectionFileError, match=r"hidden_size=64.*hidden_size=32"):
        DirectionSet.random(64, 3, 1).validate_for(model)
    path = DirectionSet.random(32, 5, 1).save(tmp_path / "five.safetensors")
    with pytest.raises(DirectionFileError, match=r"five.safetensors.*num_layers=5.*num_hidden_layers=3"):
        DirectionSet.load(path).validate_for(model)


def test_invalid_bases_are_rejected():
    good = torch.linalg.qr(torch.randn(16, 2))[0]
    with pytest.raises(DirectionFileError, match="NaN or Inf"):
        DirectionSet({0: good * float("nan")}, 2)
    with pytest.raises(DirectionFileError, match="not orthonormal"):
        DirectionSet({0: torch.ones(16, 2)}, 2)
    with pytest.raises(DirectionFileError, match="out of range"):
        DirectionSet({5: good}, 2)
    with pytest.raises(DirectionFileError, match="disagree on hidden size"):
        DirectionSet({0: good, 1: torch.linalg.qr(torch.randn(8, 1))[0]}, 2)
    with pytest.raises(DirectionFileError, match=r"expected shape \(hidden_size, k\)"):
        DirectionSet({0: torch.zeros(16, 0)}, 2)


def test_slightly_off_basis_is_reorthonormalised_with_a_warning():
    basis = torch.linalg.qr(torch.randn(16, 2, dtype=torch.float64))[0].float() * 1.001
    with pytest.warns(UserWarning, match="re-orthonormalising"):
        directions = DirectionSet({0: basis}, 1)
    assert torch.allclose(directions.bases[0].T @ directions.bases[0], torch.eye(2), atol=1e-6)


def test_bad_files(tmp_path):
    with pytest.raises(DirectionFileError, match="missing.safetensors: direction file not found"):
        DirectionSet.load(tmp_path / "missing.safetensors")
    path = DirectionSet.random(32, 3, 2).save(tmp_path / "d.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DirectionFileError, match="truncated.safetensors: not a readable safetensors file"):
        DirectionSet.load(truncated)
    from safetensors.torch import save_file

    save_file({"layers.0.basis": torch.eye(4)[:, :1].contiguous()}, tmp_path / "plain.safetensors")
    with pytest.raises(DirectionFileError, match="no 'grasp' metadata"):
        DirectionSet.load(tmp_path / "plain.safetensors")
    save_file(
        {"weird": torch.eye(4)[:, :1].contiguous()},
        tmp_path / "weird.safetensors",
        metadata={"grasp": json.dumps({"format_version": 1, "num_layers": 1})},
    )
    with pytest.raises(DirectionFileError, match="unexpected tensor 'weird'"):
        DirectionSet.load(tmp_path / "weird.safetensors")
    save_file(
        {"layers.0.basis": torch.eye(4)[:, :1].contiguous()},
        tmp_path / "future.safetensors",
        metadata={"grasp": json.dumps({"format_version": 99, "num_layers": 1})},
    )
    with pytest.raises(DirectionFileError, match="format_version 99"):
        DirectionSet.load(tmp_path / "future.safetensors")
    save_file(
        {"layers.0.basis": torch.full((4, 1), float("inf"))},
        tmp_path / "inf.safetensors",
        metadata={"grasp": json.dumps({"format_version": 1, "num_layers": 1})},
    )
    with pytest.raises(DirectionFileError, match="inf.safetensors: layers.0.basis: contains NaN or Inf"):
        DirectionSet.load(tmp_path / "inf.safetensors")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = DirectionSet.random(32, 3, 1, seed=0).save(tmp_path / "d.safetensors")
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        DirectionSet.random(32, 3, 1, seed=1).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # no temp file left behind


def test_restricted_to_layers():
    directions = DirectionSet.random(32, 4, 1)
    assert sorted(directions.restricted_to([1, 3]).bases) == [1, 3]
    with pytest.raises(DirectionFileError, match=r"grasp_layers: \[7\] out of range"):
        directions.restricted_to([7])


def test_saved_files_get_the_users_umask_not_mkstemps_0600(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        path = DirectionSet.random(8, 2, k=1).save(tmp_path / "d.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_set_is_an_immutable_value_with_explicit_provenance(tmp_path):
    """Nothing can change a set after construction; variants are new sets; only `load` gives a `path`, and the
    bytes it read stay the set's `file_bytes` whatever happens to the file afterwards."""
    directions = DirectionSet.random(16, 2, k=1, seed=3)
    for attempt in (
        lambda: setattr(directions, "num_layers", 5),
        lambda: setattr(directions, "metadata", {}),
        lambda: directions.bases.__setitem__(0, torch.zeros(16, 1)),
        lambda: directions.metadata.__setitem__("scope", "global"),
    ):
        with pytest.raises((AttributeError, TypeError)):
            attempt()
    tagged = directions.with_metadata(scope="global", base_model="tiny")
    assert tagged.metadata["scope"] == "global" and "scope" not in directions.metadata
    assert torch.equal(tagged.bases[1], directions.bases[1]) and directions.path is None and tagged.path is None
    path = directions.save(tmp_path / "d.safetensors")
    loaded = DirectionSet.load(path)
    assert loaded.path == path and loaded.source == str(path)
    recorded = loaded.file_bytes
    DirectionSet.random(16, 2, k=1, seed=4).save(tmp_path / "other.safetensors")
    path.write_bytes((tmp_path / "other.safetensors").read_bytes())  # the file is replaced on disk
    assert loaded.file_bytes == recorded and loaded.sha256 != DirectionSet.load(path).sha256
    assert loaded.restricted_to([0]).path is None  # a derived set is not the file
