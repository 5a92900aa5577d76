"""``cora inspect``: summary text and plots of a real basis file."""

from __future__ import annotations

import pytest
import torch

from cora.basis import Basis
from cora.cli import main
from cora.extract import ExtractConfig, extract_basis
from cora.inspection import angle_figure, source_angles


@pytest.fixture
def basis_file(tmp_path, tiny_llama_dir, tiny_llama_variant_dir):
    config = ExtractConfig(models=(str(tiny_llama_dir), str(tiny_llama_variant_dir)), rank=4, show_progress=False)
    return extract_basis(config).save(tmp_path / "basis.safetensors")


def test_inspect_prints_metadata_and_energy(basis_file, capsys):
    assert main(["inspect", str(basis_file)]) == 0
    out = capsys.readouterr().out
    assert "rank 4, side output, group qkv" in out
    assert "layer   1: qkv " in out
    assert "sha256" in out


def test_inspect_writes_plots(tmp_path, basis_file, tiny_llama_dir, capsys):
    plots = tmp_path / "plots"
    assert main(["inspect", str(basis_file), "--plot", str(plots), "--sources", str(tiny_llama_dir)]) == 0
    for name in ("spectrum.png", "principal_angles.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_source_basis_has_zero_angle_to_itself(tiny_llama_dir, tmp_path):
    basis = extract_basis(ExtractConfig(models=(str(tiny_llama_dir),), rank=4, show_progress=False))
    angles = source_angles(basis, [str(tiny_llama_dir)])[str(tiny_llama_dir)]
    assert max(float(a.max()) for a in angles.values()) < 1e-3


def test_two_source_basis_differs_from_each_source(basis_file, tiny_llama_dir):
    angles = source_angles(Basis.load(basis_file), [str(tiny_llama_dir)])[str(tiny_llama_dir)]
    assert max(float(a.max()) for a in angles.values()) > 0.1
    assert all(a.shape == torch.Size([4]) for a in angles.values())


def test_angle_plot_has_integer_layer_ticks(basis_file, tiny_llama_dir):
    basis = Basis.load(basis_file)
    axis = angle_figure(basis, source_angles(basis, [str(tiny_llama_dir)])).axes[0]
    low, high = axis.get_xlim()
    ticks = [t for t in axis.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_inspect_sources_prints_largest_angle_per_layer(basis_file, tiny_llama_dir, tiny_llama_variant_dir, capsys):
    basis = Basis.load(basis_file)
    angles = source_angles(basis, [str(tiny_llama_dir), str(tiny_llama_variant_dir)])
    assert main(["inspect", str(basis_file), "--sources", str(tiny_llama_dir), str(tiny_llama_variant_dir)]) == 0
    out = capsys.readouterr().out
    for layer in basis.metadata.layers:
        degrees = [torch.rad2deg(angles[str(s)][f"layers.{layer}.qkv"].max()).item()
                   for s in (tiny_llama_dir, tiny_llama_variant_dir)]
        expected = f"layer {layer:3d} qkv: {tiny_llama_dir} {degrees[0]:.2f}  {tiny_llama_variant_dir} {degrees[1]:.2f}"
        assert expected in out
