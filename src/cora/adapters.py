"""CoRA adapters: PEFT LoRA layers whose basis-side factor comes from a common basis.

A CoRA adapter is a plain PEFT LoRA adapter (``LoraConfig`` + ``get_peft_model``)
whose factors are overwritten after PEFT creates them::

    y = x @ W.T + scaling * (x @ A.T) @ B.T      A = lora_A: (r, in)   B = lora_B: (out, r)

    side=output:  B = basis (out, r)     A = the free factor (a_init)
    side=input:   A = basis.T (r, in)    B = the free factor (a_init)

Modes (in brackets, the names in Xiao et al., "CoRA", arXiv 2409.02119):

* ``lora``: plain PEFT LoRA, the baseline. A basis, if given, only selects the
  target modules.
* ``frozen`` [FB, frozen basis]: the basis-side factor is frozen, only the free
  factor trains, so each adapted layer trains ``r * in`` parameters (side=output)
  or ``r * out`` (side=input).
* ``trainable`` [TB, trainable basis]: both factors train, starting from the basis.

A fused q/k/v module (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, ...) with an output-side
basis gets one LoRA of rank ``3r``: ``lora_B`` holds ``U_q``, ``U_k`` and ``U_v`` in
separate column blocks on their own output rows (:func:`fused_output_B`), which
equals three rank-r LoRAs. Frozen mode then trains ``3r * in`` parameters per
fused module; trainable mode trains ``3r * (in + fused_out)``, because the zero
entries outside the blocks train too.

``b_init`` always names what fills the basis-side factor and ``a_init`` the free
factor, whichever of ``lora_A``/``lora_B`` the side makes them. So with side=input,
``b_init`` sets ``lora_A`` and ``a_init`` sets ``lora_B``.

The frozen factor stays frozen through PEFT's own mechanism: each LoRA layer's
``frozen_peft_weight_names`` (PEFT >= 0.20, the same list that keeps MiCA's B
frozen), which ``set_adapter`` re-applies after every switch. A saved adapter is a
standard PEFT folder plus ``cora_adapter.json``, which plain PEFT ignores and
:func:`load_cora_adapter` reads to freeze the factor again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from cora.basis import Basis
from cora.files import atomic_directory

logger = logging.getLogger(__name__)

MODES = ("lora", "frozen", "trainable")
B_INITS = ("basis", "zeros", "ones", "gaussian", "orthogonal")
A_INITS = ("kaiming", "zeros")
SIDES = ("output", "input")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj")
DEFAULT_RANK = 8
SIDECAR_NAME = "cora_adapter.json"
SIDECAR_VERSION = 1
PEFT_INITS = re.compile(r"default|pissa|pissa_niter_[1-9][0-9]*")  # LoraConfig.init_lora_weights values offered


@dataclass
class AdapterConfig:
    """How to build one adapter; validated at construction."""

    mode: str = "frozen"  # lora | frozen (FB in the CoRA paper) | trainable (TB)
    r: int | None = None  # rank; None: the basis rank, or 8 without a basis
    lora_alpha: float | None = None  # scaling = lora_alpha / r; None: equal to r (scaling 1)
    lora_dropout: float = 0.0  # dropout on the adapter input
    target_modules: tuple[str, ...] | None = None  # None: the basis modules, or q_proj/k_proj/v_proj
    b_init: str = "basis"  # basis-side factor: basis | zeros | ones | gaussian | orthogonal
    a_init: str = "kaiming"  # free factor: kaiming (PEFT's lora_A init) | zeros
    side: str | None = None  # output | input; only used without a basis (a basis carries its side)
    init_seed: int = 0  # seed of the random ablation matrices and of the free factor
    # mode lora only: "default" (PEFT's init), "pissa" or "pissa_niter_N" (PiSSA, arXiv 2404.02948)
    init_lora_weights: str = "default"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"invalid mode {self.mode!r}; expected one of {MODES}")
        if self.b_init not in B_INITS:
            raise ValueError(f"invalid b_init {self.b_init!r}; expected one of {B_INITS}")
        if self.a_init not in A_INITS:
            raise ValueError(f"invalid a_init {self.a_init!r}; expected one of {A_INITS}")
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"invalid side {self.side!r}; expected one of {SIDES}")
        if self.r is not None and self.r < 1:
            raise ValueError(f"invalid r {self.r}; expected a positive integer")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"invalid lora_alpha {self.lora_alpha}; expected a positive number")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"invalid lora_dropout {self.lora_dropout}; expected a value in [0, 1)")
        if self.mode == "lora" and (self.b_init != "basis" or self.a_init != "kaiming"):
            raise ValueError(
                f"b_init {self.b_init!r} and a_init {self.a_init!r} apply to modes frozen and trainable; "
                "mode 'lora' always uses PEFT's initialisation (lora_A Kaiming, lora_B zeros)"
            )
        if not PEFT_INITS.fullmatch(self.init_lora_weights):
            raise ValueError(
                f"invalid init_lora_weights {self.init_lora_weights!r}; expected default, pissa or pissa_niter_N"
            )
        if self.init_lora_weights != "default" and self.mode != "lora":
            raise ValueError(
                f"init_lora_weights {self.init_lora_weights!r} applies to mode 'lora' only; "
                f"mode {self.mode!r} initialises its factors from b_init and a_init"
            )
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        elif self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("invalid target_modules (): expected at least one module name, or None")


@dataclass(frozen=True)
class AdaptedModule:
    """One module that receives a LoRA adapter."""

    name: str  # full module name in the base model, e.g. "model.layers.0.self_attn.q_proj"
    layer: int
    roles: tuple[str, ...]  # q/k/v roles served by this module: one, or three for a fused module


# --- target selection and basis checks -------------------------------------------------------------


def _num_layers(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def _matches(module_name: str, targets: tuple[str, ...]) -> bool:
    return any(module_name == t or module_name.endswith(f".{t}") for t in targets)


def select_modules(model: Any, basis: Basis | None, config: AdapterConfig) -> list[AdaptedModule]:
    """List the modules to adapt, checking that the basis fits the model.

    Raises:
        ValueError: the basis covers layers or modules the model lacks, or the
            target modules match nothing.
    """
    if basis is None:
        return _select_without_basis(model, config)

    metadata = basis.metadata
    model_layers = _num_layers(model)
    beyond = [i for i in metadata.layers if i >= model_layers]
    if beyond:
        raise ValueError(
            f"basis does not fit the model: basis layers {len(metadata.layers)} (up to index {max(metadata.layers)}) "
            f"vs model layers {model_layers}; extract a basis from models of this architecture"
        )
    if metadata.model_type != getattr(model.config, "model_type", metadata.model_type):
        logger.warning(
            "basis was extracted from model_type %r but the model is %r", metadata.model_type, model.config.model_type
        )

    if metadata.fused_module is not None:
        return _select_fused(model, basis, config)

    selected = []
    for layer in metadata.layers:
        for record in metadata.modules:
            name = f"{metadata.layer_prefix}.{layer}.{record.name}"
            if config.target_modules is not None and not _matches(name, config.target_modules):
                continue
            selected.append(AdaptedModule(name, layer, (record.role,)))
    if not selected:
        names = [record.name for record in metadata.modules]
        raise ValueError(
            f"target_modules {list(config.target_modules or ())} match none of the basis modules {names}; "
            "pick target modules the basis covers"
        )
    return selected


def _select_fused(model: Any, basis: Basis, config: AdapterConfig) -> list[AdaptedModule]:
    metadata = basis.metadata
    if metadata.side == "input" and metadata.group == "module":
        raise ValueError(
            f"fused q/k/v module {metadata.fused_module!r} with side=input, group=module is not supported: "
            "q, k and v share the fused module's input, so they cannot take three different lora_A; "
            "extract with --group qkv (one lora_A for the fused input) or --side output"
        )
    # side=input: one lora_A serves q, k and v, because they read the same input.
    # side=output: one rank-3r LoRA whose lora_B holds the q, k and v bases in separate column blocks.
    return [
        AdaptedModule(f"{metadata.layer_prefix}.{layer}.{metadata.fused_module}", layer, ("q", "k", "v"))
        for layer in metadata.layers
    ]


def is_fused_output(basis: Basis | None, config: AdapterConfig) -> bool:
    """Whether the adapter uses the rank-3r block layout on a fused q/k/v module (see :func:`fused_output_B`)."""
    return (
        basis is not None
        and basis.metadata.fused_module is not None
        and basis.metadata.side == "output"
        and config.mode != "lora"
    )


def _select_without_basis(model: Any, config: AdapterConfig) -> list[AdaptedModule]:
    targets = config.target_modules or DEFAULT_TARGET_MODULES
    selected = []
    for name, module in model.named_modules():
        # A model that already has adapters wraps its linear layers in LoraLayer.
        if not isinstance(module, (torch.nn.Linear, LoraLayer)) or not _matches(name, targets):
            continue
        layer = next((int(part) for part in name.split(".") if part.isdigit()), -1)
        selected.append(AdaptedModule(name, layer, ()))
    if not selected:
        raise ValueError(f"target_modules {list(targets)} match no linear module of the model; check the names")
    return selected


# --- factor initialisation -------------------------------------------------------------------------


def _ablation_matrix(kind: str, dim: int, r: int, generator: torch.Generator) -> torch.Tensor:
    # NOTE: every ablation matrix has unit-norm columns, the scale of an orthonormal basis,
    # so that only the direction of the subspace differs between ablations.
    if kind == "zeros":
        return torch.zeros(dim, r)
    if kind == "ones":
        return torch.full((dim, r), 1.0 / math.sqrt(dim))
    gaussian = torch.randn(dim, r, generator=generator)  # (dim, r)
    if kind == "gaussian":
        return gaussian / gaussian.norm(dim=0, keepdim=True)
    q, _ = torch.linalg.qr(gaussian)  # (dim, r), orthonormal columns
    return q


def _basis_factor(
    basis: Basis | None, module: AdaptedModule, dim: int, r: int, config: AdapterConfig, generator: torch.Generator
) -> torch.Tensor:
    """The ``(dim, r)`` matrix for the basis-side factor of one module."""
    if config.b_init != "basis":
        return _ablation_matrix(config.b_init, dim, r, generator)
    if basis is None:
        raise ValueError("b_init 'basis' needs a basis file; pass --basis or choose another b_init")
    factor = basis.factor(module.layer, module.roles[0])  # (dim, basis.rank)
    if factor.shape[0] != dim:
        side = basis.metadata.side
        raise ValueError(
            f"basis does not fit the model: basis dim {factor.shape[0]} vs module {'out' if side == 'output' else 'in'} "
            f"{dim} for {module.name}; extract a basis from models of this architecture"
        )
    return factor[:, :r]


def fused_output_B(
    basis: Basis | None, module: AdaptedModule, fused_rows: dict[str, list[int]], fused_out: int, r: int,
    config: AdapterConfig, generator: torch.Generator,
) -> torch.Tensor:
    """The ``(fused_out, 3r)`` lora_B of a fused q/k/v module with an output-side basis.

    Column block ``j`` serves role ``j`` of (q, k, v) and is non-zero only on that role's output rows:
    ``B[rows_q, 0:r] = U_q``, ``B[rows_k, r:2r] = U_k``, ``B[rows_v, 2r:3r] = U_v``, all other entries
    zero. With ``lora_A = [A_q; A_k; A_v]`` of shape ``(3r, in)``, ``B @ A`` equals three separate
    rank-r LoRAs ``U_q @ A_q``, ``U_k @ A_k`` and ``U_v @ A_v`` placed on their rows.
    """
    blocks = torch.zeros(fused_out, 3 * r)  # (fused_out, 3r)
    for index, role in enumerate(("q", "k", "v")):
        rows = torch.tensor(fused_rows[role])
        role_module = AdaptedModule(module.name, module.layer, (role,))
        factor = _basis_factor(basis, role_module, len(rows), r, config, generator)  # (out_role, r)
        blocks[rows, index * r:(index + 1) * r] = factor.to(blocks.dtype)
    return blocks


def _free_factor(kind: str, shape: tuple[int, int], fan: int, generator: torch.Generator) -> torch.Tensor:
    """Return the initial free factor: zeros, or uniform in +-1/sqrt(fan).

    The bound is that of PEFT's Kaiming-uniform lora_A (a = sqrt(5)), whose fan is
    the layer's input width. A free lora_B (side=input) takes the layer's output
    width as its fan, so that B A starts as small as it does on the output side.
    Its own fan-in, r, would give entries about sqrt(out / r) times larger, a
    perturbation that raised SmolLM2's initial loss from about 1.6 to 12.8.
    """
    if kind == "zeros":
        return torch.zeros(shape)
    bound = 1.0 / math.sqrt(fan)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def _set_factors(
    layer: LoraLayer,
    adapter_name: str,
    module: AdaptedModule,
    basis: Basis | None,
    config: AdapterConfig,
    side: str,
    generator: torch.Generator,
) -> None:
    lora_A = layer.lora_A[adapter_name].weight  # (r, in); (3r, in) for a fused module with side=output
    lora_B = layer.lora_B[adapter_name].weight  # (out, r)
    r = lora_A.shape[0]
    with torch.no_grad():
        if is_fused_output(basis, config):
            fused_rows = basis.metadata.fused_rows
            lora_B.copy_(fused_output_B(basis, module, fused_rows, lora_B.shape[0], r // 3, config, generator))
            lora_A.copy_(_free_factor(config.a_init, tuple(lora_A.shape), lora_A.shape[1], generator).to(lora_A.dtype))
        elif side == "output":
            basis_side = _basis_factor(basis, module, lora_B.shape[0], r, config, generator)  # (out, r)
            lora_B.copy_(basis_side.to(lora_B.dtype))
            lora_A.copy_(_free_factor(config.a_init, tuple(lora_A.shape), lora_A.shape[1], generator).to(lora_A.dtype))
        else:
            basis_side = _basis_factor(basis, module, lora_A.shape[1], r, config, generator)  # (in, r)
            lora_A.copy_(basis_side.T.to(lora_A.dtype))
            lora_B.copy_(_free_factor(config.a_init, tuple(lora_B.shape), lora_B.shape[0], generator).to(lora_B.dtype))


def freeze_factor(layer: LoraLayer, adapter_name: str, weight_name: str) -> None:
    """Mark ``weight_name`` (``lora_A`` or ``lora_B``) of one adapter as frozen, the way PEFT's MiCA does.

    PEFT's ``set_adapter`` re-freezes every weight listed in the layer's
    ``frozen_peft_weight_names`` after it marks the active adapter trainable.
    """
    frozen = dict(layer.frozen_peft_weight_names)  # a copy: never mutate the class-level default
    names = frozen.get(adapter_name, ())
    if weight_name not in names:
        frozen[adapter_name] = (*names, weight_name)
    layer.frozen_peft_weight_names = frozen
    getattr(layer, weight_name)[adapter_name].weight.requires_grad_(False)


# --- building and saving ---------------------------------------------------------------------------


def _resolve_rank(basis: Basis | None, config: AdapterConfig) -> int:
    if basis is None or config.mode == "lora":
        return config.r or (basis.rank if basis is not None else DEFAULT_RANK)
    r = config.r or basis.rank
    if r > basis.rank and config.b_init == "basis":
        raise ValueError(f"rank {r} exceeds the basis rank {basis.rank}; lower r or extract a basis of rank {r}")
    return r


def _resolve_side(basis: Basis | None, config: AdapterConfig) -> str:
    if basis is None:
        return config.side or "output"
    if config.side is not None and config.side != basis.metadata.side:
        raise ValueError(
            f"side {config.side!r} conflicts with the basis side {basis.metadata.side!r}; "
            "leave side unset when a basis is given"
        )
    return basis.metadata.side


def _task_type(model: Any) -> str | None:
    """PEFT task type: ``CAUSAL_LM`` for generative models, None (a plain ``PeftModel``) for encoders such as BERT."""
    can_generate = getattr(model, "can_generate", None)
    return "CAUSAL_LM" if can_generate is None or can_generate() else None


def _lora_config(
    modules: list[AdaptedModule], r: int, config: AdapterConfig, fused_output: bool = False,
    task_type: str | None = "CAUSAL_LM",
) -> LoraConfig:
    alpha = config.lora_alpha if config.lora_alpha is not None else r
    if fused_output:
        # Three rank-r LoRAs side by side: PEFT rank 3r, with lora_alpha tripled so that
        # scaling = lora_alpha / r stays that of one rank-r LoRA.
        r, alpha = 3 * r, 3 * alpha
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights=True if config.init_lora_weights == "default" else config.init_lora_weights,
        target_modules=[module.name for module in modules],
        task_type=task_type,
    )


def _sidecar_record(basis: Basis | None, config: AdapterConfig, side: str, r: int) -> dict[str, Any]:
    frozen = []
    if config.mode == "frozen":
        frozen = ["lora_B" if side == "output" else "lora_A"]
    record: dict[str, Any] = {
        "format_version": SIDECAR_VERSION,
        "adapter_config": {**asdict(config), "r": r, "side": side},
        "frozen_weights": frozen,
    }
    if basis is not None:
        record["basis"] = {
            "rank": basis.rank,
            "side": basis.metadata.side,
            "group": basis.metadata.group,
            "sources": [source.model_id for source in basis.metadata.sources],
        }
    return record


def add_cora_adapter(
    peft_model: PeftModel, basis: Basis | None, config: AdapterConfig, adapter_name: str
) -> PeftModel:
    """Add one more CoRA (or plain LoRA) adapter to a model that already has PEFT adapters."""
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; choose another adapter_name")
    base = peft_model.get_base_model()
    modules = select_modules(base, basis, config)
    r = _resolve_rank(basis, config)
    lora_config = _lora_config(modules, r, config, is_fused_output(basis, config), _task_type(base))
    peft_model.add_adapter(adapter_name, lora_config)
    _initialise_adapter(peft_model, modules, basis, config, adapter_name, r)
    return peft_model


def build_cora_model(
    base_model: Any, basis: Basis | None, config: AdapterConfig, adapter_name: str = "default"
) -> PeftModel:
    """Wrap ``base_model`` in a PEFT model with one CoRA adapter.

    Args:
        base_model: a transformers model: a causal LM, or an encoder such as BERT (then a plain
            ``PeftModel`` without a task type).
        basis: the common basis; None for plain LoRA or for the ablations whose
            ``b_init`` needs no basis (zeros, ones, gaussian, orthogonal).
        config: mode, rank and initialisation.
        adapter_name: PEFT adapter name.

    Raises:
        ValueError: the basis does not fit the model (layer count, module shapes),
            or the config needs a basis that was not given.
    """
    modules = select_modules(base_model, basis, config)
    r = _resolve_rank(basis, config)
    lora_config = _lora_config(modules, r, config, is_fused_output(basis, config), _task_type(base_model))
    peft_model = get_peft_model(base_model, lora_config, adapter_name=adapter_name)
    _initialise_adapter(peft_model, modules, basis, config, adapter_name, r)
    if config.init_lora_weights.startswith("pissa"):
        _save_pissa_initial_adapter(peft_model, adapter_name)
    return peft_model


def _save_pissa_initial_adapter(peft_model: PeftModel, adapter_name: str) -> None:
    """Save the adapter as initialised, so that saving after training can convert it to plain LoRA.

    PiSSA subtracts its initial ``B @ A`` from the base weights. PEFT's
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` turns the
    trained adapter into a rank-2r LoRA adapter of the unmodified base model,
    given the initial adapter saved with ``init_lora_weights=True``.
    """
    # NOTE: Trainer checkpoints of a PiSSA run are not converted; resuming one rebuilds the residual from the
    # base weights, which is exact for "pissa" but differs for "pissa_niter_N" (randomised SVD).
    folder = Path(tempfile.mkdtemp(prefix="cora-pissa-init-"))
    peft_model.peft_config[adapter_name].init_lora_weights = True
    peft_model.save_pretrained(str(folder / "saved"), selected_adapters=[adapter_name])
    saved = folder / "saved" if adapter_name == "default" else folder / "saved" / adapter_name
    # PEFT loads the initial adapter under its folder name, which must differ from every adapter name in use.
    initial_dir = folder / "cora_pissa_initial"
    os.replace(saved, initial_dir)
    initial = getattr(peft_model, "cora_initial_adapters", {})
    initial[adapter_name] = initial_dir
    peft_model.cora_initial_adapters = initial
    weakref.finalize(peft_model, shutil.rmtree, folder, True)


def _initialise_adapter(
    peft_model: PeftModel,
    modules: list[AdaptedModule],
    basis: Basis | None,
    config: AdapterConfig,
    adapter_name: str,
    r: int,
) -> None:
    side = _resolve_side(basis, config)
    records = getattr(peft_model, "cora_records", {})
    records[adapter_name] = _sidecar_record(basis, config, side, r)
    peft_model.cora_records = records
    if config.mode == "lora":
        return

    generator = torch.Generator().manual_seed(config.init_seed)
    base = peft_model.get_base_model()
    for module in modules:
        layer = base.get_submodule(module.name)
        _set_factors(layer, adapter_name, module, basis, config, side, generator)
        if config.mode == "frozen":
            freeze_factor(layer, adapter_name, "lora_B" if side == "output" else "lora_A")
    logger.info(
        "adapter %r: mode %s, side %s, r %d, %d modules, b_init %s, a_init %s",
        adapter_name, config.mode, side, r, len(modules), config.b_init, config.a_init,
    )


def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """All LoRA layers of a PEFT model, by module name in the base model."""
    base = peft_model.get_base_model()
    return {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}


def save_cora_adapter(peft_model: PeftModel, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Save one adapter as a standard PEFT folder plus ``cora_adapter.json``, atomically.

    ``directory`` itself becomes the PEFT folder (``adapter_config.json``,
    ``adapter_model.safetensors``), whatever the adapter name. A PiSSA adapter is
    saved converted to a rank-2r LoRA adapter of the unmodified base model.
    """
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        initial = getattr(peft_model, "cora_initial_adapters", {}).get(adapter_name)
        conversion = {"path_initial_model_for_weight_conversion": str(initial)} if initial is not None else {}
        peft_model.save_pretrained(str(staging), selected_adapters=[adapter_name], **conversion)

        # PEFT puts a non-default adapter in a subfolder named after it; lift its files up.
        if adapter_name != "default":
            subfolder = staging / adapter_name
            for entry in subfolder.iterdir():
                entry.rename(staging / entry.name)
            subfolder.rmdir()

        record = getattr(peft_model, "cora_records", {}).get(adapter_name)
        if record is not None:
            (staging / SIDECAR_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return directory


def read_sidecar(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``cora_adapter.json`` record of a saved adapter, or None for a plain PEFT adapter."""
    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("format_version", 0) > SIDECAR_VERSION:
        raise ValueError(f"{path} has format version {record['format_version']}; upgrade cora-adapters")
    return record


def load_cora_adapter(
    model: Any, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """Load a saved adapter with PEFT and freeze the factor that ``cora_adapter.json`` lists.

    ``model`` is a transformers model (a new PEFT model is built) or a
    ``PeftModel`` (the adapter is added to it under ``adapter_name``).
    """
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no PEFT adapter in {directory}: adapter_config.json is missing")
    if isinstance(model, PeftModel):
        model.load_adapter(str(directory), adapter_name=adapter_name, is_trainable=is_trainable)
        peft_model = model
    else:
        peft_model = PeftModel.from_pretrained(
            model, str(directory), adapter_name=adapter_name, is_trainable=is_trainable
        )

    record = read_sidecar(directory)
    if record is None:
        return peft_model
    records = getattr(peft_model, "cora_records", {})
    records[adapter_name] = record
    peft_model.cora_records = records
    for layer in lora_layers(peft_model).values():
        if adapter_name in layer.lora_A:
            for weight_name in record.get("frozen_weights", ()):
                freeze_factor(layer, adapter_name, weight_name)
    return peft_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
