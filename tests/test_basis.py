"""The basis file format: round trip, validation and atomic writes."""

import pytest
import torch

from cora.basis import Basis, BasisMetadata, ModuleRecord, SourceRecord


def make_metadata(group: str = "qkv", rank: int = 2) -> BasisMetadata:
    return BasisMetadata(
        rank=rank,
        side="output",
        group=group,
        architecture="LlamaForCausalLM",
        model_type="llama",
        layer_prefix="model.layers",
        layers=(0, 1),
        modules=tuple(ModuleRecord(role, f"self_attn.{role}_proj", (8, 8)) for role in "qkv"),
        sources=(SourceRecord("some/model", "main", ({"path": "model.safetensors", "sha256": "0" * 64},)),),
        energy={"layers.0.qkv": 0.5, "layers.1.qkv": 0.25},
    )


def make_basis(rank: int = 2) -> Basis:
    metadata = make_metadata(rank=rank)
    factors = {f"layers.{i}.qkv": torch.linalg.qr(torch.randn(8, rank))[0] for i in (0, 1)}
    values = {f"layers.{i}.qkv": torch.linspace(3, 1, 8) for i in (0, 1)}
    return Basis(factors=factors, singular_values=values, metadata=metadata)


def test_basis_save_load_round_trip(tmp_path):
    basis = make_basis()
    path = basis.save(tmp_path / "basis.safetensors")
    loaded = Basis.load(path)
    assert loaded.metadata == basis.metadata
    for key, factor in basis.factors.items():
        assert torch.equal(loaded.factors[key], factor)
    assert torch.equal(loaded.factor(1, "k"), basis.factors["layers.1.qkv"])


def test_basis_save_leaves_no_temporary_file(tmp_path):
    make_basis().save(tmp_path / "basis.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["basis.safetensors"]


def test_basis_rejects_wrong_rank_factor():
    metadata = make_metadata(rank=3)
    factors = {f"layers.{i}.qkv": torch.zeros(8, 2) for i in (0, 1)}
    with pytest.raises(ValueError, match=r"expected \(dim, 3\)"):
        Basis(factors=factors, singular_values={}, metadata=metadata)


def test_basis_metadata_rejects_invalid_side():
    with pytest.raises(ValueError, match="invalid side 'left'"):
        BasisMetadata(
            rank=2, side="left", group="qkv", architecture="x", model_type="x",
            layer_prefix="model.layers", layers=(0,), modules=(), sources=(),
        )


def test_basis_load_rejects_plain_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a cora basis file"):
        Basis.load(path)
