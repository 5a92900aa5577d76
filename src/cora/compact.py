"""Compact adapters: only the trained factor, plus the basis file that supplies the frozen one.

A frozen-basis adapter (mode ``frozen``, ``b_init`` basis) saved as a PEFT folder
repeats the basis in every task adapter. The compact format stores one
safetensors file per adapter::

    tensors:  "{module}.lora_A"  (r, in)   the trained factor, side=output
              "{module}.lora_B"  (out, r)  the trained factor, side=input
    header:   "cora_compact": JSON with the PEFT LoraConfig, the cora_adapter.json
              record (adapter config, mode, b_init, side, frozen weights) and the
              basis file's name, sha256, rank, side and group

``module`` is the module name in the base model, e.g.
``model.layers.0.self_attn.q_proj``. Loading rebuilds the frozen factor from the
basis file, after checking its sha256, so a compact adapter never silently runs
with another basis.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cora.adapters import SIDECAR_NAME, AdapterConfig, AdaptedModule, freeze_factor, lora_layers, read_sidecar
from cora.basis import Basis, file_sha256
from cora.files import atomic_directory, atomic_file

logger = logging.getLogger(__name__)

COMPACT_KEY = "cora_compact"
COMPACT_VERSION = 1
COMPACT_SUFFIX = ".cora.safetensors"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class BasisReference:
    """The basis file a compact adapter was trained with."""

    name: str  # file name when the adapter was written, e.g. "smollm2-r8.safetensors"
    sha256: str
    rank: int
    side: str
    group: str


@dataclass
class CompactAdapter:
    """A compact adapter read from disk: trained tensors and everything needed to rebuild the rest."""

    tensors: dict[str, torch.Tensor]  # "{module}.lora_A" or "{module}.lora_B" -> trained factor
    lora_config: dict[str, Any]  # LoraConfig.to_dict()
    record: dict[str, Any]  # the cora_adapter.json record
    basis: BasisReference

    @property
    def frozen_weight(self) -> str:
        return self.record["frozen_weights"][0]

    @property
    def trained_weight(self) -> str:
        return "lora_A" if self.frozen_weight == "lora_B" else "lora_B"

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(**self.record["adapter_config"])


# --- checks ----------------------------------------------------------------------------------------


def check_compactable(record: dict[str, Any] | None, where: str) -> None:
    """Reject adapters whose frozen factor does not come from a basis file."""
    if record is None:
        raise ValueError(f"{where} has no cora_adapter.json; only cora adapters in mode 'frozen' can be compacted")
    config = record["adapter_config"]
    if config["mode"] != "frozen" or config["b_init"] != "basis":
        raise ValueError(
            f"{where} was trained with mode {config['mode']!r} and b_init {config['b_init']!r}; the compact format "
            "needs mode 'frozen' with b_init 'basis', where the basis file rebuilds the frozen factor. "
            "Keep the standard PEFT folder for other adapters"
        )


def check_basis_file(basis_path: str | os.PathLike | None, reference: BasisReference, adapter: str) -> str:
    """Return the sha256 of ``basis_path`` after checking that it is the adapter's basis file.

    Raises:
        FileNotFoundError: no basis path was given, or the file does not exist.
        ValueError: the file's sha256 differs from the one the adapter records.
    """
    needed = f"basis file {reference.name!r} (sha256 {reference.sha256})"
    if basis_path is None:
        raise FileNotFoundError(f"compact adapter {adapter} needs the {needed}; pass its path as basis_path (--basis)")
    basis_path = Path(basis_path)
    if not basis_path.is_file():
        raise FileNotFoundError(f"basis file not found: {basis_path}; compact adapter {adapter} needs the {needed}")
    digest = file_sha256(basis_path)
    if digest != reference.sha256:
        raise ValueError(
            f"basis file {basis_path} has sha256 {digest}, but compact adapter {adapter} was trained with the "
            f"{needed}; pass that file"
        )
    return digest


# --- writing ---------------------------------------------------------------------------------------


def _basis_reference(basis_path: Path, basis: Basis) -> BasisReference:
    metadata = basis.metadata
    return BasisReference(basis_path.name, file_sha256(basis_path), basis.rank, metadata.side, metadata.group)


def _frozen_factor(basis: Basis, module: AdaptedModule, r: int, frozen_weight: str) -> torch.Tensor:
    """Slice the frozen factor of one module from the basis: lora_B (out, r) or lora_A (r, in)."""
    factor = basis.factor(module.layer, module.roles[0])[:, :r]  # (dim, r), a view of the basis tensor
    return factor if frozen_weight == "lora_B" else factor.T


def _write_compact(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    with atomic_file(path) as temp_path:
        save_file(contiguous, str(temp_path), metadata={COMPACT_KEY: json.dumps(header, sort_keys=True)})
    return path


def save_compact_adapter(
    peft_model: PeftModel, path: str | os.PathLike, basis_path: str | os.PathLike, adapter_name: str = "default"
) -> Path:
    """Save one frozen-basis adapter of ``peft_model`` as a compact file, atomically.

    Raises:
        ValueError: the adapter is not a frozen-basis adapter, or its frozen factor
            differs from the basis in ``basis_path``.
    """
    from peft import get_peft_model_state_dict

    record = getattr(peft_model, "cora_records", {}).get(adapter_name)
    where = f"adapter {adapter_name!r}"
    check_compactable(record, where)
    weights = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    tensors, header = _compact_tensors(weights, record, peft_model.peft_config[adapter_name], Path(basis_path), where)
    return _write_compact(Path(path), tensors, header)


def compact_peft_folder(
    adapter_dir: str | os.PathLike, basis_path: str | os.PathLike, output_path: str | os.PathLike
) -> Path:
    """Convert a standard PEFT adapter folder of a frozen-basis adapter into a compact file.

    The frozen factor in the folder must equal the one the basis file gives, bit for
    bit, which proves that ``basis_path`` is the basis the adapter was trained with.

    Raises:
        ValueError: the adapter is not a frozen-basis adapter, or its frozen factor
            differs from the basis.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no PEFT adapter in {adapter_dir}: adapter_config.json is missing")
    record = read_sidecar(adapter_dir)
    check_compactable(record, str(adapter_dir))
    lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    weights = load_file(str(adapter_dir / PEFT_WEIGHTS_NAME))  # "base_model.model.{module}.lora_X.weight"
    tensors, header = _compact_tensors(weights, record, lora_config, Path(basis_path), str(adapter_dir))
    return _write_compact(Path(output_path), tensors, header)


def _compact_tensors(
    weights: dict[str, torch.Tensor], record: dict[str, Any], lora_config: LoraConfig, basis_path: Path, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Keep the trained factor of each module, after checking the frozen one against the basis."""
    basis = Basis.load(basis_path)
    frozen_weight = record["frozen_weights"][0]
    trained_weight = "lora_A" if frozen_weight == "lora_B" else "lora_B"
    r = record["adapter_config"]["r"]
    tensors = {}
    for module in modules_from_basis(basis, set(lora_config.target_modules)):
        frozen = weights[f"{PEFT_PREFIX}{module.name}.{frozen_weight}.weight"]
        if not torch.equal(frozen, _frozen_factor(basis, module, r, frozen_weight).to(frozen.dtype)):
            raise ValueError(
                f"the {frozen_weight} of {module.name} in {where} differs from basis file {basis_path}; "
                "pass the basis file the adapter was trained with"
            )
        tensors[f"{module.name}.{trained_weight}"] = weights[f"{PEFT_PREFIX}{module.name}.{trained_weight}.weight"]

    header = {
        "format_version": COMPACT_VERSION,
        "lora_config": _lora_config_dict(lora_config),
        "record": record,
        "basis": _basis_reference(basis_path, basis).__dict__,
    }
    return tensors, header


def _lora_config_dict(lora_config: LoraConfig) -> dict[str, Any]:
    # to_dict() contains sets (target_modules) and enums, which JSON cannot store as they are.
    raw = lora_config.to_dict()
    return json.loads(json.dumps(raw, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))


def modules_from_basis(basis: Basis, target_modules: set[str]) -> list[AdaptedModule]:
    """The basis modules that ``target_modules`` selects, with the layer and roles the basis gives them.

    ``target_modules`` matches as in PEFT: a full module name or a name suffix. PEFT
    itself rewrites a list of 20 or more full names into suffixes such as ``q_proj``.

    Raises:
        ValueError: a target module selects no module of the basis.
    """
    metadata = basis.metadata
    if metadata.fused_module is not None and metadata.side == "output":
        # NOTE: such a lora_B is a (fused_out, 3r) block matrix built from three bases,
        # not a slice of one, so the compact loader cannot rebuild it yet.
        raise ValueError(
            f"compact adapters do not support the fused q/k/v module {metadata.fused_module!r} with an "
            "output-side basis; keep the standard PEFT folder, or use side=input for fused modules"
        )
    if metadata.fused_module is not None:
        candidates = [(metadata.fused_module, ("q", "k", "v"))]
    else:
        candidates = [(record.name, (record.role,)) for record in metadata.modules]
    modules = []
    matched: set[str] = set()
    for layer in metadata.layers:
        for relative_name, roles in candidates:
            name = f"{metadata.layer_prefix}.{layer}.{relative_name}"
            targets = {t for t in target_modules if name == t or name.endswith(f".{t}")}
            if targets:
                modules.append(AdaptedModule(name, layer, roles))
                matched |= targets
    uncovered = sorted(target_modules - matched)
    if uncovered:
        raise ValueError(f"the basis has no factor for adapted modules {uncovered[:3]}; pass the adapter's basis file")
    return modules


# --- reading ---------------------------------------------------------------------------------------


def read_compact_adapter(path: str | os.PathLike) -> CompactAdapter:
    """Read a compact adapter file (tensors and header); the basis is not touched."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compact adapter not found: {path}")
    with safe_open(str(path), framework="pt") as reader:
        header = (reader.metadata() or {}).get(COMPACT_KEY)
        if header is None:
            raise ValueError(f"{path} is not a compact cora adapter: its header has no {COMPACT_KEY!r} entry")
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    raw = json.loads(header)
    if raw.get("format_version", 0) > COMPACT_VERSION:
        raise ValueError(f"{path} has compact format version {raw['format_version']}; upgrade cora-adapters")
    return CompactAdapter(tensors, raw["lora_config"], raw["record"], BasisReference(**raw["basis"]))


def load_compact_adapter(
    model: Any,
    path: str | os.PathLike,
    basis: Basis | str | os.PathLike | None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    basis_sha256: str | None = None,
) -> PeftModel:
    """Load a compact adapter onto ``model`` and rebuild its frozen factor from the basis.

    Args:
        model: a transformers model (a new PEFT model is built) or a ``PeftModel``
            (the adapter is added under ``adapter_name``).
        path: the compact adapter file.
        basis: the basis file path, or a :class:`Basis` already loaded from the file
            whose sha256 is ``basis_sha256``. A loaded basis is shared: each frozen
            factor is a view of its tensor, not a copy.
        adapter_name: PEFT adapter name.
        is_trainable: leave the trained factor trainable (to continue training).
        basis_sha256: sha256 of the file ``basis`` was loaded from; needed with a
            loaded :class:`Basis`.

    Raises:
        FileNotFoundError: the basis file is missing; the message names the file needed.
        ValueError: the basis file differs from the adapter's (sha256 mismatch).
    """
    compact = read_compact_adapter(path)
    basis = _checked_basis(basis, compact.basis, str(path), basis_sha256)
    lora_config = LoraConfig(**_config_fields(compact.lora_config))
    lora_config.inference_mode = not is_trainable

    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; choose another adapter_name")
        model.add_adapter(adapter_name, lora_config)
        peft_model = model
    else:
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)

    _fill_factors(peft_model, compact, basis, adapter_name, is_trainable)
    records = getattr(peft_model, "cora_records", {})
    records[adapter_name] = compact.record
    peft_model.cora_records = records
    return peft_model


def _checked_basis(
    basis: Basis | str | os.PathLike | None, reference: BasisReference, adapter: str, basis_sha256: str | None
) -> Basis:
    if isinstance(basis, Basis):
        if basis_sha256 is None:
            raise ValueError("a loaded Basis needs basis_sha256, the sha256 of the file it was loaded from")
        if basis_sha256 != reference.sha256:
            raise ValueError(
                f"basis with sha256 {basis_sha256} differs from the basis file {reference.name!r} "
                f"(sha256 {reference.sha256}) that compact adapter {adapter} was trained with; pass that file"
            )
        return basis
    check_basis_file(basis, reference, adapter)
    return Basis.load(basis)


def _config_fields(raw: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    return {key: value for key, value in raw.items() if key in known}


def _fill_factors(
    peft_model: PeftModel, compact: CompactAdapter, basis: Basis, adapter_name: str, is_trainable: bool
) -> None:
    """Copy the trained factor into each LoRA layer and point the frozen factor at the basis tensor."""
    layers = lora_layers(peft_model)
    r = compact.record["adapter_config"]["r"]
    frozen_weight, trained_weight = compact.frozen_weight, compact.trained_weight
    modules = modules_from_basis(basis, set(compact.lora_config["target_modules"]))
    missing = [f"{m.name}.{trained_weight}" for m in modules if f"{m.name}.{trained_weight}" not in compact.tensors]
    if missing:
        raise ValueError(f"compact adapter lacks trained tensors for {missing[:3]}; the file is incomplete")

    for module in modules:
        layer = layers[module.name]
        trained = getattr(layer, trained_weight)[adapter_name].weight
        with torch.no_grad():
            trained.copy_(compact.tensors[f"{module.name}.{trained_weight}"].to(trained.dtype))
        trained.requires_grad_(is_trainable)

        frozen = getattr(layer, frozen_weight)[adapter_name]
        factor = _frozen_factor(basis, module, r, frozen_weight)
        if factor.dtype != frozen.weight.dtype or factor.device != frozen.weight.device:
            # NOTE: a cast makes a copy per adapter; load the basis in the model's dtype to share it.
            factor = factor.to(device=frozen.weight.device, dtype=frozen.weight.dtype)
        frozen.weight = torch.nn.Parameter(factor, requires_grad=False)
        freeze_factor(layer, adapter_name, frozen_weight)


def expand_compact_adapter(
    path: str | os.PathLike, basis_path: str | os.PathLike, output_dir: str | os.PathLike
) -> Path:
    """Write a compact adapter back out as a standard PEFT folder with ``cora_adapter.json``.

    The folder loads with ``PeftModel.from_pretrained`` and needs no basis file.
    It is written to a temporary folder beside ``output_dir`` and renamed.
    """
    compact = read_compact_adapter(path)
    basis = _checked_basis(basis_path, compact.basis, str(path), None)
    r = compact.record["adapter_config"]["r"]
    weights = {}
    for module in modules_from_basis(basis, set(compact.lora_config["target_modules"])):
        trained = compact.tensors[f"{module.name}.{compact.trained_weight}"]
        frozen = _frozen_factor(basis, module, r, compact.frozen_weight).to(trained.dtype)
        weights[f"{PEFT_PREFIX}{module.name}.{compact.trained_weight}.weight"] = trained.contiguous()
        # A clone, because with group=qkv the q, k and v factors are views of one basis tensor.
        weights[f"{PEFT_PREFIX}{module.name}.{compact.frozen_weight}.weight"] = frozen.contiguous().clone()

    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as temp_dir:
        LoraConfig(**_config_fields(compact.lora_config)).save_pretrained(str(temp_dir))
        save_file(weights, str(temp_dir / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (temp_dir / SIDECAR_NAME).write_text(json.dumps(compact.record, indent=2, sort_keys=True) + "\n")
    return output_dir
