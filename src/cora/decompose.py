"""Top-r left singular vectors of a matrix given as column blocks.

Extraction decomposes ``M = [B_1 | B_2 | ... | B_n]`` of shape ``(dim, sum cols)``:
for the output side the blocks are the weights ``W`` (``dim = out``), for the
input side their transposes (``dim = in``). The methods:

* ``exact``: concatenate in float64 and run a full SVD.
* ``gram``: accumulate ``G = sum_i B_i @ B_i.T`` in float64, one block at a time
  (memory ``dim x dim`` whatever the number of blocks). Its top-r eigenvectors
  come from block subspace iteration with Rayleigh-Ritz. A dense ``eigh`` is
  used instead when the rank is a large part of ``dim`` or the whole spectrum
  is needed. The eigenvalues of ``G`` are the squared singular values of ``M``.
* ``randomized``: a randomized range finder (Halko, Martinsson and Tropp, 2011)
  with oversampling and power iterations applied block by block in float32,
  iterated until the captured energy of the top-r Ritz vectors stops changing.
* ``auto``: ``gram`` while ``dim`` is at most :data:`AUTO_GRAM_MAX_DIM` or the
  rank exceeds ``dim / 4``, ``randomized`` otherwise.

Accuracy is measured as captured energy relative to the exact top-r basis,
``||U_r.T M||_F^2 / ||U_exact.T M||_F^2``, because principal angles are large
whenever singular values r and r+1 lie close together.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

METHODS = ("exact", "gram", "randomized", "auto")
# Above this dim, the float64 Gram products cost more than the randomized finder's float32 passes.
# Measured at rank 8 on a shared 2-core x86_64 machine: with 9 square blocks, gram took 0.78 s and
# randomized 0.50 s at dim 1024, and 5.4 s against 2.4 s at dim 2048. On four of SmolLM2's
# (192, 576) k weights, gram took 0.02 s and randomized 0.12 s.
AUTO_GRAM_MAX_DIM = 1024


@dataclass(frozen=True)
class RandomizedOptions:
    """Settings of the randomized range finder."""

    oversample: int = 16  # extra columns beyond the rank; the subspace has rank + max(oversample, rank) columns
    min_power_iterations: int = 2
    max_power_iterations: int = 30
    tolerance: float = 1e-6  # stop when the relative change of captured energy falls below this
    seed: int = 0
    # The top-r eigensolver of gram: each step is one (dim, dim) @ (dim, width) product, cheap enough
    # to iterate until the energy settles to near float64 precision.
    gram_tolerance: float = 1e-12
    gram_max_iterations: int = 300

    def __post_init__(self) -> None:
        if self.oversample < 0:
            raise ValueError(f"invalid oversample {self.oversample}; expected >= 0")
        if not 0 <= self.min_power_iterations <= self.max_power_iterations:
            raise ValueError(
                f"invalid power iterations {self.min_power_iterations}..{self.max_power_iterations}; "
                "expected 0 <= min <= max"
            )
        if self.gram_max_iterations < self.min_power_iterations:
            raise ValueError(
                f"invalid gram_max_iterations {self.gram_max_iterations}; expected >= min_power_iterations "
                f"({self.min_power_iterations})"
            )


@dataclass
class Decomposition:
    """Top-r basis of one decomposed matrix."""

    basis: torch.Tensor  # (dim, r) float64, orthonormal columns, sign fixed
    singular_values: torch.Tensor  # (k,) float64, largest first: k = r for iterative solvers, else all
    total_energy: float  # ||M||_F^2 (after centring, if any)
    method: str
    flops: float = 0.0  # estimated floating-point operations of the decomposition

    @property
    def captured_energy(self) -> float:
        """Fraction of ``||M||_F^2`` captured by the top-r singular values."""
        r = self.basis.shape[1]
        if self.total_energy == 0:
            return 1.0
        return float((self.singular_values[:r] ** 2).sum() / self.total_energy)


class ColumnBlocks:
    """``M = [B_1 | ... | B_n]`` minus an optional mean column, without concatenating the blocks."""

    def __init__(self, blocks: list[torch.Tensor], center: bool = False):
        dims = {b.shape[0] for b in blocks}
        if len(dims) != 1:
            raise ValueError(f"column blocks have different row counts {sorted(dims)}; expected one")
        self.blocks = blocks
        self.dim = dims.pop()
        self.columns = sum(b.shape[1] for b in blocks)
        self.mean = None  # (dim,) float64 mean column, subtracted when centring
        if center:
            self.mean = sum(b.double().sum(dim=1) for b in blocks) / self.columns

    def frobenius_squared(self) -> float:
        total = sum(float(b.double().pow(2).sum()) for b in self.blocks)
        if self.mean is not None:
            total -= self.columns * float(self.mean @ self.mean)
        return total

    def dense(self) -> torch.Tensor:
        matrix = torch.cat([b.double() for b in self.blocks], dim=1)  # (dim, columns)
        if self.mean is not None:
            matrix -= self.mean[:, None]
        return matrix

    def gram(self) -> torch.Tensor:
        gram = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for block in self.blocks:
            block = block.double()
            gram.addmm_(block, block.T)
        if self.mean is not None:
            gram -= self.columns * torch.outer(self.mean, self.mean)
        return gram  # (dim, dim)

    def transpose_times(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Return ``M.T @ y`` split by block: one ``(cols_i, k)`` tensor per block."""
        parts = [b.to(y.dtype).T @ y for b in self.blocks]
        if self.mean is not None:
            shift = self.mean.to(y.dtype) @ y  # (k,)
            parts = [p - shift for p in parts]
        return parts

    def times(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Return ``M @ x`` for ``x`` split by block as returned by :meth:`transpose_times`."""
        result = sum(b.to(parts[0].dtype) @ p for b, p in zip(self.blocks, parts))  # (dim, k)
        if self.mean is not None:
            result = result - torch.outer(self.mean.to(result.dtype), sum(p.sum(dim=0) for p in parts))
        return result


def fix_signs(basis: torch.Tensor) -> torch.Tensor:
    """Flip columns so that the largest-magnitude entry of each is positive."""
    rows = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[rows, torch.arange(basis.shape[1])])
    signs[signs == 0] = 1
    return basis * signs


def resolve_method(method: str, dim: int, rank: int) -> str:
    """Return the concrete method that ``auto`` stands for at this shape."""
    if method not in METHODS:
        raise ValueError(f"invalid method {method!r}; expected one of {METHODS}")
    if method != "auto":
        return method
    if dim <= AUTO_GRAM_MAX_DIM or rank > dim // 4:
        return "gram"
    return "randomized"


def decompose(
    blocks: list[torch.Tensor],
    rank: int,
    method: str = "auto",
    center: bool = False,
    randomized: RandomizedOptions | None = None,
    full_spectrum: bool = False,
) -> Decomposition:
    """Top-``rank`` left singular vectors of ``[B_1 | ... | B_n]``.

    Args:
        blocks: matrices with equal row count ``dim``; any float dtype.
        rank: number of basis columns, at most ``dim``.
        method: exact, gram, randomized or auto.
        center: subtract the mean column first (PCA on the columns).
        randomized: settings of the subspace iterations: the randomized finder and the top-r
            eigensolver of ``gram``.
        full_spectrum: with ``gram``, compute every eigenvalue with a dense ``eigh`` (needed to
            choose a rank by energy) instead of the top-r eigensolver.

    Returns:
        A :class:`Decomposition` with a ``(dim, rank)`` float64 basis.
    """
    matrix = ColumnBlocks(blocks, center=center)
    if not 1 <= rank <= matrix.dim:
        raise ValueError(f"rank {rank} is out of range for a matrix with {matrix.dim} rows")
    options = randomized or RandomizedOptions()
    method = resolve_method(method, matrix.dim, rank)
    total = matrix.frobenius_squared()

    dim, columns = matrix.dim, matrix.columns
    if method == "exact":
        u, s, _ = torch.linalg.svd(matrix.dense(), full_matrices=False)
        basis, singular_values = u[:, :rank], s
        small, large = sorted((dim, columns))
        flops = 4 * small**2 * large + 8 * small**3  # textbook count for an SVD with thin U
    elif method == "gram" and (full_spectrum or not use_top_eigensolver(dim, rank, options)):
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix.gram())  # ascending
        basis = eigenvectors[:, -rank:].flip(1)
        singular_values = eigenvalues.flip(0).clamp_min(0).sqrt()
        flops = 2 * dim**2 * columns + 9 * dim**3  # Gram products, then a dense eigh
    elif method == "gram":
        basis, eigenvalues, iterations, width = _top_eigenvectors(matrix.gram(), rank, options)
        singular_values = eigenvalues.clamp_min(0).sqrt()
        flops = 2 * dim**2 * columns + iterations * 2 * dim**2 * width  # Gram products, then G @ Q per iteration
    else:
        basis, singular_values, passes, width = _randomized(matrix, rank, options)
        flops = passes * 2 * dim * columns * width  # each pass multiplies M or M.T by (., width)

    return Decomposition(fix_signs(basis), singular_values, total, method, float(flops))


def subspace_width(dim: int, rank: int, options: RandomizedOptions) -> int:
    """Columns of the iterated subspace: the rank plus ``max(oversample, rank)``, at most ``dim``."""
    return min(dim, rank + max(options.oversample, rank))


def use_top_eigensolver(dim: int, rank: int, options: RandomizedOptions) -> bool:
    """Whether ``gram`` should iterate on a top-r subspace rather than call a dense ``eigh``.

    Subspace iteration costs ``2 * dim**2 * width`` per step, about 20 steps, against roughly
    ``9 * dim**3`` for ``eigh``. Measured with one thread (``benchmarks/extract.py --eigensolvers``):
    at dim 4096 the iteration took 0.4 to 2.8 s for r = 8 to 64 against 17.5 s for ``eigh``; at
    dim 576 it tied with ``eigh`` (0.03 s against 0.04 s) at r = 16 and lost at r = 64.
    """
    return 16 * subspace_width(dim, rank, options) <= dim


def _top_eigenvectors(
    gram: torch.Tensor, rank: int, options: RandomizedOptions
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Top-``rank`` eigenvectors of a symmetric PSD ``gram`` by block subspace iteration.

    Each step multiplies the subspace by ``gram``, runs Rayleigh-Ritz on it and stops when the sum
    of the top-r Ritz values (the captured energy) changes by less than ``options.gram_tolerance``.

    Returns:
        The basis ``(dim, rank)``, the top-r Ritz values (largest first), the number of products
        with ``gram`` and the subspace width.
    """
    dim = gram.shape[0]
    width = subspace_width(dim, rank, options)
    generator = torch.Generator().manual_seed(options.seed)
    q, _ = torch.linalg.qr(torch.randn(dim, width, generator=generator, dtype=torch.float64))  # (dim, width)

    previous = -math.inf
    for iteration in range(options.gram_max_iterations + 1):
        product = gram @ q  # (dim, width)
        ritz = q.T @ product  # (width, width)
        eigenvalues, eigenvectors = torch.linalg.eigh((ritz + ritz.T) / 2)
        captured = float(eigenvalues[-rank:].sum())
        converged = abs(captured - previous) <= options.gram_tolerance * abs(captured)
        if converged and iteration >= options.min_power_iterations:
            break
        if iteration == options.gram_max_iterations:
            logger.warning("top-r eigensolver stopped after %d iterations before the captured energy settled "
                           "(relative change above %g)", iteration, options.gram_tolerance)
            break
        previous = captured
        q, _ = torch.linalg.qr(product)

    basis = q @ eigenvectors[:, -rank:].flip(1)  # (dim, rank)
    return basis, eigenvalues[-rank:].flip(0), iteration + 1, width


def _randomized(
    matrix: ColumnBlocks, rank: int, options: RandomizedOptions
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Subspace iteration on ``M @ M.T`` from a Gaussian start, with Rayleigh-Ritz at each step.

    Returns:
        The basis ``(dim, rank)``, the top-r Ritz singular values, the number of products with ``M`` or
        ``M.T`` and the subspace width.
    """
    width = subspace_width(matrix.dim, rank, options)
    generator = torch.Generator().manual_seed(options.seed)
    start = [torch.randn(b.shape[1], width, generator=generator) for b in matrix.blocks]
    q, _ = torch.linalg.qr(matrix.times(start))  # (dim, width) float32

    previous = -math.inf
    for iteration in range(options.max_power_iterations + 1):
        projected = matrix.transpose_times(q)  # M.T @ Q, split by block
        ritz = sum(p.double().T @ p.double() for p in projected)  # Q.T M M.T Q: (width, width)
        eigenvalues, eigenvectors = torch.linalg.eigh(ritz)
        captured = float(eigenvalues[-rank:].sum())
        converged = abs(captured - previous) <= options.tolerance * abs(captured)
        if iteration >= options.max_power_iterations or (converged and iteration >= options.min_power_iterations):
            break
        previous = captured
        q, _ = torch.linalg.qr(matrix.times(projected))
    logger.debug("randomized finder: %d power iterations, width %d", iteration, width)

    basis = q.double() @ eigenvectors[:, -rank:].flip(1)  # (dim, rank)
    basis, _ = torch.linalg.qr(basis)  # re-orthonormalise after the float32 products; signs are fixed later
    singular_values = eigenvalues.flip(0)[:rank].clamp_min(0).sqrt()  # Ritz values past r have not converged
    return basis, singular_values, 2 * iteration + 2, width


def energy_ratio(basis: torch.Tensor, reference: torch.Tensor, blocks: list[torch.Tensor], center: bool = False) -> float:
    """``||basis.T M||_F^2 / ||reference.T M||_F^2``: captured energy relative to a reference basis."""
    matrix = ColumnBlocks(blocks, center=center)
    captured = sum(float(p.pow(2).sum()) for p in matrix.transpose_times(basis.double()))
    best = sum(float(p.pow(2).sum()) for p in matrix.transpose_times(reference.double()))
    return captured / best if best else 1.0


def principal_angles(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Principal angles in radians between the column spans of two orthonormal bases, smallest first."""
    cosines = torch.linalg.svdvals(first.double().T @ second.double()).clamp(-1, 1)
    return torch.arccos(cosines).sort().values
