"""Summaries and plots of a basis file, for ``cora inspect``.

Per-source principal angles need the sources themselves: the basis file does
not store each source's own subspace, so :func:`source_angles` re-extracts it
from each given source with the basis's rank, side, group and options, and
compares it with the common basis.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cora.basis import Basis, tensor_key
from cora.decompose import principal_angles
from cora.extract import ExtractConfig, extract_basis

logger = logging.getLogger(__name__)


def summary_lines(basis: Basis) -> list[str]:
    """Return human-readable lines: metadata, then captured energy per layer and target."""
    meta = basis.metadata
    lines = [
        f"architecture: {meta.architecture} (model_type {meta.model_type}), layer prefix {meta.layer_prefix}",
        f"rank {meta.rank}, side {meta.side}, group {meta.group}, method {meta.method}",
        "modules: " + ", ".join(f"{m.role}={m.name} {tuple(m.shape)}" for m in meta.modules),
    ]
    if meta.fused_module:
        lines.append(f"fused module: {meta.fused_module}")
    for source in meta.sources:
        files = ", ".join(f"{f['path']} sha256 {f['sha256'][:12]}" for f in source.files)
        revision = f"@{source.revision}" if source.revision else ""
        lines.append(f"source: {source.model_id}{revision} [{files}]")
    options = {k: v for k, v in meta.options.items() if v not in (None, False, "none")}
    lines.append(f"options: {options}")
    lines.append("captured energy per layer:")
    for layer in meta.layers:
        energies = "  ".join(f"{t} {meta.energy.get(f'layers.{layer}.{t}', float('nan')):.4f}" for t in meta.targets)
        lines.append(f"  layer {layer:3d}: {energies}")
    return lines


def source_angles(basis: Basis, sources: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Principal angles (radians) between each source's own subspace and the common one.

    Returns:
        ``{source: {"layers.{i}.{target}": angles (r,)}}``.
    """
    meta = basis.metadata
    names = tuple(m.name for m in meta.modules) if not meta.fused_module else None
    angles: dict[str, dict[str, torch.Tensor]] = {}
    for source in sources:
        own = extract_basis(
            ExtractConfig(
                models=(source,), rank=meta.rank, side=meta.side, group=meta.group, layers=meta.layers,
                normalize=meta.options.get("normalize", "none"), center=bool(meta.options.get("center")),
                base_model=meta.options.get("base_model"), module_names=names, show_progress=False,
            )
        )
        angles[source] = {
            key: principal_angles(_orthonormal(own.factors[key]), _orthonormal(basis.factors[key]))
            for key in basis.factors
        }
    return angles


def angle_lines(basis: Basis, angles: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Return lines of the largest principal angle (degrees) per layer and target, one column per source.

    Args:
        angles: the result of :func:`source_angles`.
    """
    meta = basis.metadata
    lines = ["largest principal angle (degrees), source subspace vs common basis:"]
    for layer in meta.layers:
        for target in meta.targets:
            key = tensor_key(layer, target)
            cells = "  ".join(f"{source} {torch.rad2deg(per_key[key].max()).item():.2f}"
                              for source, per_key in angles.items())
            lines.append(f"  layer {layer:3d} {target}: {cells}")
    return lines


def _orthonormal(factor: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(factor.double())  # columns may carry singular values
    return q


def write_plots(
    basis: Basis,
    directory: str | Path,
    sources: list[str] | None = None,
    angles: dict[str, dict[str, torch.Tensor]] | None = None,
) -> list[Path]:
    """Write spectrum, energy-vs-rank and (with sources) principal-angle plots as PNG files.

    Args:
        sources: source models for the principal-angle plot.
        angles: the result of :func:`source_angles` for ``sources``, when already computed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []

    figure, (spectrum, energy) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, values in basis.singular_values.items():
        values = values.double()
        spectrum.semilogy(values.numpy(), linewidth=0.8, label=key)
        cumulative = torch.cumsum(values**2, 0) / _total_energy(basis, key, values)
        energy.plot(range(1, len(values) + 1), cumulative.numpy(), linewidth=0.8)
    spectrum.axvline(basis.rank - 0.5, color="black", linestyle="--", linewidth=0.8)
    spectrum.set(title="singular values per layer", xlabel="index", ylabel="singular value")
    energy.axvline(basis.rank, color="black", linestyle="--", linewidth=0.8)
    energy.set(title="captured energy vs rank (computed singular values)", xlabel="rank",
               ylabel="energy fraction", ylim=(0, 1.01))
    if len(basis.singular_values) <= 12:
        spectrum.legend(fontsize=6)
    written.append(_save(figure, directory / "spectrum.png"))
    plt.close(figure)

    if sources or angles:
        figure = angle_figure(basis, angles if angles is not None else source_angles(basis, sources))
        written.append(_save(figure, directory / "principal_angles.png"))
        plt.close(figure)
    return written


def angle_figure(basis: Basis, angles: dict[str, dict[str, torch.Tensor]]):
    """Plot the largest principal angle (degrees) against the layer index, one line per source and target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    meta = basis.metadata
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for source, per_key in angles.items():
        for target in meta.targets:
            largest = [torch.rad2deg(per_key[tensor_key(i, target)].max()).item() for i in meta.layers]
            label = Path(source).name or source
            if len(meta.targets) > 1:
                label = f"{label} {target}"
            axis.plot(meta.layers, largest, marker="o", markersize=3, label=label)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # layer indices are whole numbers
    axis.set(title="largest principal angle: source subspace vs common basis", xlabel="layer",
             ylabel="angle (degrees)")
    axis.legend(fontsize=7)
    return figure


def _total_energy(basis: Basis, key: str, values: torch.Tensor) -> float:
    """``||M||_F^2`` of one decomposed matrix, recovered from the stored captured-energy fraction.

    Iterative methods store only the top-r singular values, so their squares do not sum to the total.
    """
    rank = basis.rank
    fraction = basis.metadata.energy.get(key)
    if fraction and len(values) >= rank:
        return float((values[:rank] ** 2).sum()) / fraction
    return float((values**2).sum())


def _save(figure, path: Path) -> Path:
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=120, bbox_inches="tight")
    temporary.replace(path)
    return path
