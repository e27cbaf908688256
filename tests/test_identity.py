"""Identity dictionaries: built once, saved, reloaded, extended, and refused when foreign."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_net
from parity_inputs import load_parity_inputs

from dmdnet_plugin import IdentityDictionary, IdentityError
from dmdnet_plugin.identity import atoms_on


@pytest.fixture(scope="module")
def inputs():
    return load_parity_inputs()


def test_save_load_round_trip_restores_identically(small, inputs, tmp_path):
    emb = np.random.default_rng(0).standard_normal((3, 128))
    ident = small.encode_identity(
        inputs["refs"], inputs["ref_boxes"], name="person-00005", embeddings=emb, damaged_embeddings=emb[::-1] * 0.5
    )
    path = ident.save(tmp_path / "p.safetensors")
    loaded = IdentityDictionary.load(path)
    assert (loaded.name, loaded.n_refs, loaded.model_fingerprint) == ("person-00005", 3, small.fingerprint())
    np.testing.assert_allclose(loaded.embedding, emb.mean(0), atol=1e-6)
    np.testing.assert_allclose(loaded.damaged_embedding, emb.mean(0) * 0.5, atol=1e-6)
    assert loaded.tensors.keys() == ident.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], v) for k, v in ident.tensors.items())
    a = small.restore(inputs["lq"], inputs["lq_boxes"], identity=ident)
    b = small.restore(inputs["lq"], inputs["lq_boxes"], identity=loaded)
    assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary left behind


def test_a_single_reference_is_enough(small, inputs):
    ident = small.encode_identity(inputs["refs"][:1], inputs["ref_boxes"][:1])
    assert ident.n_refs == 1
    generic = small.restore(inputs["lq"], inputs["lq_boxes"])
    specific = small.restore(inputs["lq"], inputs["lq_boxes"], identity=ident)
    assert torch.isfinite(specific).all() and (specific - generic).abs().mean() > 1e-6


def test_extending_keeps_the_old_atoms_and_equals_building_all_at_once(small, inputs):
    a = small.encode_identity(
        inputs["refs"][:2], inputs["ref_boxes"][:2], embeddings=np.ones((2, 4)), damaged_embeddings=np.full((2, 4), 3.0)
    )
    b = small.encode_identity(
        inputs["refs"][2:], inputs["ref_boxes"][2:], embeddings=np.zeros((1, 4)), damaged_embeddings=np.zeros((1, 4))
    )
    both = small.encode_identity(inputs["refs"], inputs["ref_boxes"])
    merged = a.extend(b)
    assert merged.n_refs == 3 and merged.n_embedded == 3
    np.testing.assert_allclose(merged.embedding, np.full(4, 2 / 3))
    np.testing.assert_allclose(merged.damaged_embedding, np.full(4, 2.0))
    # an older file without damaged embeddings: the merged mean would not cover every reference
    old = small.encode_identity(inputs["refs"][2:], inputs["ref_boxes"][2:], embeddings=np.zeros((1, 4)))
    assert a.extend(old).damaged_embedding is None
    for k, v in both.tensors.items():
        assert torch.equal(merged.tensors[k][:2], a.tensors[k])
        assert (merged.tensors[k] - v).abs().max() < 1e-4


def test_a_dictionary_from_another_checkpoint_is_refused(small, inputs):
    foreign = small_net(seed=1).encode_identity(inputs["refs"][:1], inputs["ref_boxes"][:1], name="other")
    assert foreign.model_fingerprint != small.fingerprint()
    with pytest.raises(IdentityError, match="built by model .* not by the loaded model"):
        small.restore(inputs["lq"][:1], inputs["lq_boxes"][:1], identity=foreign)


def test_restoring_many_batches_reuses_the_dictionary(small, inputs):
    ident = small.encode_identity(inputs["refs"][:1], inputs["ref_boxes"][:1])
    first = atoms_on(ident, torch.device("cpu"))
    small.restore(inputs["lq"][:1], inputs["lq_boxes"][:1], identity=ident)
    small.restore(inputs["lq"][1:], inputs["lq_boxes"][1:], identity=ident)
    assert atoms_on(ident, torch.device("cpu")) is first


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "not a readable identity dictionary"),
        (lambda b: b"\x00" * 64, "not a readable identity dictionary"),
        (lambda b: b"", "not a readable identity dictionary"),
    ],
)
def test_a_corrupted_file_gives_a_clear_error(small, inputs, tmp_path, damage, message):
    path = small.encode_identity(inputs["refs"][:1], inputs["ref_boxes"][:1]).save(tmp_path / "d.safetensors")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(IdentityError, match=message) as err:
        IdentityDictionary.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_is_not_an_identity_dictionary(small, tmp_path):
    from dmdnet_plugin.weights import save_checkpoint

    path = save_checkpoint(small, tmp_path / "model.safetensors")
    with pytest.raises(IdentityError, match="not an identity dictionary"):
        IdentityDictionary.load(path)
    with pytest.raises(IdentityError, match="no such identity dictionary"):
        IdentityDictionary.load(tmp_path / "missing.safetensors")
