"""The common-basis file: what extraction writes and adapters read.

A basis file is a safetensors file with, for each adapted layer ``i``:

* ``basis.layers.{i}.{target}``: the basis, shape ``(dim, r)`` with orthonormal
  columns unless ``scale_by_singular_values`` was set. ``dim`` is the module's
  ``out`` for ``side="output"`` (the basis becomes ``lora_B``) and its ``in``
  for ``side="input"`` (the basis becomes ``lora_A = basis.T``).
* ``singular_values.layers.{i}.{target}``: the singular values of the
  decomposed matrix, largest first, as many as the method computed.

``target`` is ``"qkv"`` for ``group="qkv"`` (one basis shared by the q, k and v
projections of the layer) and the role ``"q"``, ``"k"`` or ``"v"`` for
``group="module"``. The JSON metadata (:class:`BasisMetadata`) is stored in the
safetensors header under the key ``"cora_basis"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cora.files import atomic_file

FORMAT_VERSION = 1
METADATA_KEY = "cora_basis"
SIDES = ("output", "input")
GROUPS = ("qkv", "module")
ROLES = ("q", "k", "v")


@dataclass(frozen=True)
class SourceRecord:
    """One source model that went into the basis."""

    model_id: str  # Hub id, local directory or .gguf path, as given by the user
    revision: str | None = None  # Hub revision (commit, branch or tag); None for local files
    files: tuple[dict[str, str], ...] = ()  # [{"path": ..., "sha256": ...}] for each weight file read


@dataclass(frozen=True)
class ModuleRecord:
    """One projection of the attention block, as found in the source checkpoints."""

    role: str  # "q", "k" or "v"
    name: str  # module name relative to a layer, in the PEFT model, e.g. "self_attn.q_proj"
    shape: tuple[int, int]  # (out, in), PEFT layout

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"invalid module role {self.role!r}; expected one of {ROLES}")


@dataclass(frozen=True)
class BasisMetadata:
    """Everything about a basis except the tensors; stored as JSON in the file header."""

    rank: int
    side: str  # "output" (basis -> lora_B) or "input" (basis -> lora_A)
    group: str  # "qkv" (one basis per layer) or "module" (one per projection)
    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # transformers' config.model_type, e.g. "llama"
    layer_prefix: str  # module path of the layer list in the PEFT model, e.g. "model.layers"
    layers: tuple[int, ...]  # indices of the layers that have a basis
    modules: tuple[ModuleRecord, ...]  # the q, k and v projections
    sources: tuple[SourceRecord, ...]
    method: str = "exact"  # decomposition used: exact, gram, randomized
    energy: dict[str, float] = field(default_factory=dict)  # "layers.{i}.{target}" -> captured energy in [0, 1]
    options: dict[str, Any] = field(default_factory=dict)  # extraction options (normalisation, centring, ...)
    fused_module: str | None = None  # relative name of a fused q/k/v module (e.g. "attn.c_attn"), if any
    # role -> output rows of the fused module (PEFT layout (out, in)) that hold that role; empty if not fused
    fused_rows: dict[str, list[int]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created_by: str = ""

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"invalid side {self.side!r}; expected one of {SIDES}")
        if self.group not in GROUPS:
            raise ValueError(f"invalid group {self.group!r}; expected one of {GROUPS}")
        if self.rank < 1:
            raise ValueError(f"invalid rank {self.rank}; expected a positive integer")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"basis format version {self.format_version} is newer than this library "
                f"supports ({FORMAT_VERSION}); upgrade cora-adapters"
            )

    @property
    def targets(self) -> tuple[str, ...]:
        """Targets that have a tensor in each layer: ("qkv",) or ("q", "k", "v")."""
        return ("qkv",) if self.group == "qkv" else tuple(m.role for m in self.modules)

    def module(self, role: str) -> ModuleRecord:
        for record in self.modules:
            if record.role == role:
                return record
        raise KeyError(f"basis has no module with role {role!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BasisMetadata:
        raw = json.loads(text)
        raw["layers"] = tuple(raw["layers"])
        raw["modules"] = tuple(
            ModuleRecord(role=m["role"], name=m["name"], shape=tuple(m["shape"])) for m in raw["modules"]
        )
        raw["sources"] = tuple(
            SourceRecord(model_id=s["model_id"], revision=s.get("revision"), files=tuple(s.get("files", ())))
            for s in raw["sources"]
        )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def tensor_key(layer: int, target: str) -> str:
    return f"layers.{layer}.{target}"


@dataclass
class Basis:
    """A common basis: per-layer factors, their singular values and the metadata."""

    factors: dict[str, torch.Tensor]  # tensor_key(layer, target) -> (dim, r)
    singular_values: dict[str, torch.Tensor]  # tensor_key(layer, target) -> (k,)
    metadata: BasisMetadata

    def __post_init__(self) -> None:
        expected = {tensor_key(i, t) for i in self.metadata.layers for t in self.metadata.targets}
        missing = expected - self.factors.keys()
        if missing:
            raise ValueError(f"basis is missing factors for {sorted(missing)[:5]}")
        for key, factor in self.factors.items():
            if factor.ndim != 2 or factor.shape[1] != self.metadata.rank:
                raise ValueError(
                    f"basis factor {key} has shape {tuple(factor.shape)}; expected (dim, {self.metadata.rank})"
                )

    @property
    def rank(self) -> int:
        return self.metadata.rank

    def factor(self, layer: int, role: str) -> torch.Tensor:
        """Return the basis ``(dim, r)`` used for projection ``role`` of ``layer``."""
        if layer not in self.metadata.layers:
            raise KeyError(f"basis has no layer {layer}; it covers layers {list(self.metadata.layers)}")
        target = "qkv" if self.metadata.group == "qkv" else role
        return self.factors[tensor_key(layer, target)]

    def expected_dim(self, role: str) -> int:
        """The module dimension that the basis for ``role`` must match: out or in."""
        out_features, in_features = self.metadata.module(role).shape
        return out_features if self.metadata.side == "output" else in_features

    def save(self, path: str | os.PathLike) -> Path:
        """Write the basis atomically: a temporary file in the same folder, then a rename."""
        path = Path(path)
        tensors = {f"basis.{k}": v.contiguous() for k, v in self.factors.items()}
        tensors.update({f"singular_values.{k}": v.contiguous() for k, v in self.singular_values.items()})
        with atomic_file(path) as temp_path:
            save_file(tensors, str(temp_path), metadata={METADATA_KEY: self.metadata.to_json()})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> Basis:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"basis file not found: {path}; create one with `cora extract`")
        factors: dict[str, torch.Tensor] = {}
        singular_values: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device=device) as reader:
            header = reader.metadata() or {}
            if METADATA_KEY not in header:
                raise ValueError(f"{path} is not a cora basis file: its header has no {METADATA_KEY!r} entry")
            metadata = BasisMetadata.from_json(header[METADATA_KEY])
            for name in reader.keys():
                kind, _, key = name.partition(".")
                if kind == "basis":
                    factors[key] = reader.get_tensor(name)
                elif kind == "singular_values":
                    singular_values[key] = reader.get_tensor(name)
        return cls(factors=factors, singular_values=singular_values, metadata=metadata)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks of ``chunk_bytes``."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
