"""Extract a common basis from the q/k/v weights of several source models.

Data flow, one layer at a time (memory holds one layer of q/k/v for all sources)::

    sources (safetensors / GGUF / Hub)  --read q, k, v of layer i-->  {role: W (out, in)} per source
        --side, group-->  column blocks per target  --decompose-->  U_r (dim, r), S  --> Basis

``side="output"`` decomposes ``[W_1 | W_2 | ...]`` (blocks ``W``, basis ``(out, r)``
becomes ``lora_B``); ``side="input"`` decomposes ``[W_1; W_2; ...]`` (blocks
``W.T``, basis ``(in, r)``, ``lora_A = basis.T``). ``group="qkv"`` puts q, k and
v of every source into one matrix per layer; ``group="module"`` makes one
matrix per role.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from cora import __version__
from cora.architectures import AttentionLayout, find_layer_prefix, fused_rows, layout_for, split_fused
from cora.basis import GROUPS, ROLES, SIDES, Basis, BasisMetadata, ModuleRecord, tensor_key
from cora.decompose import METHODS, Decomposition, RandomizedOptions, decompose
from cora.sources import WeightSource, open_source

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("none", "frobenius")


@dataclass
class ExtractConfig:
    """Extraction settings: the sources, the basis shape and the decomposition."""

    models: tuple[str, ...]  # Hub ids (optionally id@revision), checkpoint directories or .gguf files
    rank: int | None = None  # basis columns r; None when energy_threshold chooses it
    side: str = "output"  # "output": basis -> lora_B (out, r); "input": basis -> lora_A = basis.T
    group: str = "qkv"  # "qkv": one basis per layer; "module": one per q, k, v
    method: str = "auto"  # exact, gram, randomized or auto
    energy_threshold: float | None = None  # choose the smallest rank capturing this energy fraction in every layer
    layers: tuple[int, ...] | None = None  # layer indices to extract; None for all
    normalize: str = "none"  # "frobenius": scale each source's blocks to unit Frobenius norm per layer and target
    center: bool = False  # subtract the mean column before decomposing (PCA)
    base_model: str | None = None  # decompose W_source - W_base instead of raw weights
    scale_by_singular_values: bool = False  # store U_r * S_r instead of orthonormal U_r
    module_names: tuple[str, str, str] | None = None  # explicit q, k, v module names relative to a layer
    randomized: RandomizedOptions = field(default_factory=RandomizedOptions)
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        if not self.models:
            raise ValueError("no source models given; pass at least one Hub id, directory or .gguf file")
        if self.side not in SIDES:
            raise ValueError(f"invalid side {self.side!r}; expected one of {SIDES}")
        if self.group not in GROUPS:
            raise ValueError(f"invalid group {self.group!r}; expected one of {GROUPS}")
        if self.method not in METHODS:
            raise ValueError(f"invalid method {self.method!r}; expected one of {METHODS}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"invalid normalize {self.normalize!r}; expected one of {NORMALIZATIONS}")
        if (self.rank is None) == (self.energy_threshold is None):
            raise ValueError("give exactly one of rank (--rank) and energy_threshold (--energy)")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"invalid rank {self.rank}; expected a positive integer")
        if self.energy_threshold is not None:
            if not 0 < self.energy_threshold <= 1:
                raise ValueError(f"invalid energy threshold {self.energy_threshold}; expected a fraction in (0, 1]")
            if self.method == "randomized":
                raise ValueError(
                    "--energy needs the whole spectrum, which the randomized method does not compute; "
                    "use --method gram, exact or auto"
                )
        if self.module_names is not None and len(self.module_names) != 3:
            raise ValueError(f"module_names must name q, k and v; got {self.module_names}")


class QKVReader:
    """Reads the q, k and v weights of one layer from one source, in PEFT layout ``(out, in)``."""

    def __init__(self, source: WeightSource, module_names: tuple[str, str, str] | None = None):
        self.source = source
        self.model_type = source.config.get("model_type", "")
        self.layout: AttentionLayout = layout_for(self.model_type, module_names)
        self.layer_prefix, self.layers = find_layer_prefix(source.weight_names(), self.layout.module_names[0])
        self._rows: dict[str, torch.Tensor] | None = None

    def weight_name(self, layer: int, module: str) -> str:
        return f"{self.layer_prefix}.{layer}.{module}.weight"

    def read_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Return ``{role: W}`` for ``layer``, each ``(out, in)`` in the checkpoint's dtype."""
        if layer not in self.layers:
            raise ValueError(
                f"{self.source.model_id} has no q/k/v weights for layer {layer}; "
                f"its layers with q/k/v are {_ranges(self.layers)}"
            )
        if self.layout.modules is not None:
            weights = {role: self._read(layer, self.layout.module_name(role)) for role in ROLES}
        else:
            fused = self._read(layer, self.layout.fused)
            if self._rows is None:
                fused_out = fused.shape[1] if self.layout.transposed else fused.shape[0]
                self._rows = fused_rows(self.layout, self.source.config, fused_out)
            weights = split_fused(self.layout, fused, self._rows)
        return weights

    def fused_rows(self) -> dict[str, list[int]]:
        """Rows of each role in the fused module's output (empty for separate projections)."""
        return {role: rows.tolist() for role, rows in (self._rows or {}).items()}

    def _read(self, layer: int, module: str) -> torch.Tensor:
        name = self.weight_name(layer, module)
        if name not in set(self.source.weight_names()):
            raise ValueError(f"{self.source.model_id} has no weight {name}; layer {layer} lacks a q/k/v projection")
        weight = self.source.read(name)
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise ValueError(
                f"weight {name} in {self.source.file_of(name)} has {bad} NaN or Inf entries; "
                "the checkpoint is corrupt or was saved after a diverged run"
            )
        return weight


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}..{indices[-1]}" if indices == list(range(indices[0], indices[-1] + 1)) else str(indices)


def open_readers(models: tuple[str, ...], module_names: tuple[str, str, str] | None) -> list[QKVReader]:
    """Open each source and locate its q/k/v weights."""
    readers = []
    for spec in models:
        source = open_source(spec, qkv_weight_filter=lambda config, names: _qkv_names(config, names, module_names))
        readers.append(QKVReader(source, module_names))
    model_types = {r.model_type for r in readers}
    if len(model_types) > 1:
        logger.warning("sources have different model types %s; shapes are checked layer by layer", sorted(model_types))
    return readers


def _qkv_names(config: dict, names: list[str], module_names: tuple[str, str, str] | None) -> list[str]:
    layout = layout_for(config.get("model_type", ""), module_names)
    suffixes = tuple(f".{m}.weight" for m in layout.module_names)
    return [n for n in names if n.endswith(suffixes)]


def check_shapes(readers: list[QKVReader], layer: int, weights: list[dict[str, torch.Tensor]]) -> None:
    """Raise if a source's q/k/v shapes differ from the first source's."""
    first = weights[0]
    for reader, current in zip(readers[1:], weights[1:]):
        for role in ROLES:
            if current[role].shape != first[role].shape:
                raise ValueError(
                    f"layer {layer} {role}: {readers[0].source.model_id} has shape {tuple(first[role].shape)} "
                    f"but {reader.source.model_id} has {tuple(current[role].shape)}; "
                    "all sources must share the architecture"
                )


def check_rank(rank: int, shapes: dict[str, tuple[int, int]], names: dict[str, str], side: str, group: str) -> None:
    """Raise if the rank exceeds a module's smaller dimension, or if output-side qkv meets GQA."""
    for role, (out_features, in_features) in shapes.items():
        if rank > min(out_features, in_features):
            raise ValueError(
                f"rank {rank} exceeds min(out, in) = {min(out_features, in_features)} for layers.0.{names[role]}; "
                "choose a smaller --rank"
            )
    outs = {shape[0] for shape in shapes.values()}
    if side == "output" and group == "qkv" and len(outs) > 1:
        listed = ", ".join(f"{role} {shape}" for role, shape in shapes.items())
        raise ValueError(
            f"side=output, group=qkv needs q, k and v with equal out, but the (out, in) shapes are {listed} "
            "(grouped-query attention); use --group module (one basis per projection) or --side input "
            "(one basis on the shared input)"
        )


def layer_blocks(
    weights: list[dict[str, torch.Tensor]],
    side: str,
    group: str,
    base: dict[str, torch.Tensor] | None = None,
    normalize: str = "none",
) -> dict[str, list[torch.Tensor]]:
    """Column blocks of the matrix to decompose, per target, for one layer.

    Args:
        weights: ``{role: W (out, in)}`` per source.
        base: ``{role: W}`` of the base model, subtracted from every source if given.
    """
    targets = ("qkv",) if group == "qkv" else ROLES
    blocks: dict[str, list[torch.Tensor]] = {t: [] for t in targets}
    for source_weights in weights:
        for target in targets:
            roles = ROLES if target == "qkv" else (target,)
            source_blocks = []
            for role in roles:
                weight = source_weights[role].float()
                if base is not None:
                    weight = weight - base[role].float()
                source_blocks.append(weight if side == "output" else weight.T)  # (dim, cols)
            if normalize == "frobenius":
                norm = torch.sqrt(sum(b.double().pow(2).sum() for b in source_blocks))
                source_blocks = [b / norm.clamp_min(1e-30).float() for b in source_blocks]
            blocks[target].extend(source_blocks)
    return blocks


def extract_basis(config: ExtractConfig, stats: dict[str, float] | None = None) -> Basis:
    """Extract the common basis described by ``config`` from its source models.

    Args:
        config: what to extract.
        stats: if given, filled with ``read_seconds``, ``decompose_seconds`` and ``gflop`` (an
            estimate of the decomposition's floating-point work) for the main pass.
    """
    readers = open_readers(config.models, config.module_names)
    base_reader = open_readers((config.base_model,), config.module_names)[0] if config.base_model else None
    layers = _select_layers(readers, config.layers)

    first_weights = [r.read_layer(layers[0]) for r in readers]
    check_shapes(readers, layers[0], first_weights)
    shapes = {role: tuple(first_weights[0][role].shape) for role in ROLES}
    names = {role: readers[0].layout.module_name(role) for role in ROLES}
    rank = config.rank
    if rank is not None:
        check_rank(rank, shapes, names, config.side, config.group)
    else:
        check_rank(1, shapes, names, config.side, config.group)
        rank = _rank_for_energy(config, readers, base_reader, layers)
        logger.info("rank %d reaches energy %.4f in every layer", rank, config.energy_threshold)
    del first_weights

    factors, singular_values, energy, methods = {}, {}, {}, set()
    timings = {"read_seconds": 0.0, "decompose_seconds": 0.0, "gflop": 0.0}
    for layer in tqdm(layers, desc="extract", unit="layer", disable=not config.show_progress):
        for target, result in _decompose_layer(config, readers, base_reader, layer, rank, timings=timings).items():
            key = tensor_key(layer, target)
            basis = result.basis
            if config.scale_by_singular_values:
                basis = basis * result.singular_values[:rank]
            factors[key] = basis.float().contiguous()  # (dim, r)
            singular_values[key] = result.singular_values.float()
            energy[key] = result.captured_energy
            methods.add(result.method)

    if stats is not None:
        stats.update(timings)
    metadata = _metadata(config, readers, layers, shapes, names, rank, energy, methods)
    return Basis(factors=factors, singular_values=singular_values, metadata=metadata)


def _select_layers(readers: list[QKVReader], requested: tuple[int, ...] | None) -> list[int]:
    available = readers[0].layers
    for reader in readers[1:]:
        if reader.layers != available:
            raise ValueError(
                f"{reader.source.model_id} has q/k/v in layers {_ranges(reader.layers)} but "
                f"{readers[0].source.model_id} has them in layers {_ranges(available)}; "
                "all sources must share the architecture"
            )
    if requested is None:
        return available
    missing = sorted(set(requested) - set(available))
    if missing:
        raise ValueError(f"layers {missing} do not exist; the sources have q/k/v in layers {_ranges(available)}")
    return sorted(set(requested))


def _decompose_layer(
    config: ExtractConfig, readers: list[QKVReader], base_reader: QKVReader | None, layer: int, rank: int,
    method: str | None = None,
    timings: dict[str, float] | None = None,
    full_spectrum: bool = False,
) -> dict[str, Decomposition]:
    started = time.perf_counter()
    weights = [r.read_layer(layer) for r in readers]
    check_shapes(readers, layer, weights)
    base = None
    if base_reader is not None:
        base = base_reader.read_layer(layer)
        check_shapes([readers[0], base_reader], layer, [weights[0], base])
    blocks = layer_blocks(weights, config.side, config.group, base, config.normalize)
    del weights, base
    read_done = time.perf_counter()

    results = {
        target: decompose(target_blocks, rank, method or config.method, config.center, config.randomized,
                          full_spectrum=full_spectrum)
        for target, target_blocks in blocks.items()
    }
    if timings is not None:
        timings["read_seconds"] += read_done - started
        timings["decompose_seconds"] += time.perf_counter() - read_done
        timings["gflop"] += sum(r.flops for r in results.values()) / 1e9
    return results


def _rank_for_energy(
    config: ExtractConfig, readers: list[QKVReader], base_reader: QKVReader | None, layers: list[int]
) -> int:
    """Smallest rank whose captured energy reaches the threshold in every layer and target (first pass)."""
    needed = 1
    method = "gram" if config.method == "auto" else config.method
    for layer in tqdm(layers, desc="spectrum", unit="layer", disable=not config.show_progress):
        for result in _decompose_layer(config, readers, base_reader, layer, 1, method,
                                       full_spectrum=True).values():
            cumulative = torch.cumsum(result.singular_values**2, 0) / max(result.total_energy, 1e-300)
            reached = (cumulative >= config.energy_threshold - 1e-12).nonzero()
            needed = max(needed, int(reached[0]) + 1 if len(reached) else len(cumulative))
    return needed


def _metadata(
    config: ExtractConfig,
    readers: list[QKVReader],
    layers: list[int],
    shapes: dict[str, tuple[int, int]],
    names: dict[str, str],
    rank: int,
    energy: dict[str, float],
    methods: set[str],
) -> BasisMetadata:
    first = readers[0]
    architectures = first.source.config.get("architectures") or [""]
    options = {
        "normalize": config.normalize,
        "center": config.center,
        "base_model": config.base_model,
        "scale_by_singular_values": config.scale_by_singular_values,
        "energy_threshold": config.energy_threshold,
        "requested_method": config.method,
    }
    fused = first.layout.fused
    return BasisMetadata(
        rank=rank,
        side=config.side,
        group=config.group,
        architecture=architectures[0],
        model_type=first.model_type,
        layer_prefix=first.layer_prefix,
        layers=tuple(layers),
        modules=tuple(ModuleRecord(role=role, name=names[role], shape=shapes[role]) for role in ROLES),
        sources=tuple(r.source.record() for r in readers),
        method="+".join(sorted(methods)),
        energy=energy,
        options=options,
        fused_module=fused,
        fused_rows=first.fused_rows() if fused else {},
        created_by=f"cora-adapters {__version__}",
    )

