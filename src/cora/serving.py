"""Serving many task adapters on one base model and one basis.

    basis file --load once, cast to the model dtype--> Basis (one tensor per layer and target)
    task.cora.safetensors (trained factor) --+--> LoRA layer: trained factor (own copy)
                                             +--> frozen factor = view of the shared basis tensor

Every task adapter of a base model trained with the same basis refers to the
same basis tensors, so each extra task costs only its trained factor in memory
(``r * in`` per adapted module with side=output). Switching adapters uses PEFT's
``set_adapter`` in inference mode; PEFT then re-freezes each layer's
``frozen_peft_weight_names``, so no frozen factor ever becomes trainable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from cora.adapters import lora_layers
from cora.basis import Basis, file_sha256
from cora.compact import load_compact_adapter

logger = logging.getLogger(__name__)


def cast_basis(basis: Basis, dtype: torch.dtype, device: torch.device | str) -> Basis:
    """Return the basis with every factor in ``dtype`` on ``device``, one copy per factor."""
    factors = {key: factor.to(device=device, dtype=dtype) for key, factor in basis.factors.items()}
    return Basis(factors=factors, singular_values=basis.singular_values, metadata=basis.metadata)


class AdapterServer:
    """One base model with any number of compact task adapters that share one basis.

    Args:
        base_model: a transformers causal LM; it is wrapped in a ``PeftModel`` when
            the first adapter is added.
        basis_path: the basis file every adapter was trained with; its sha256 is
            checked against each adapter's record.
    """

    def __init__(self, base_model: Any, basis_path: str | os.PathLike):
        basis_path = Path(basis_path)
        if not basis_path.is_file():
            raise FileNotFoundError(f"basis file not found: {basis_path}; pass the basis the adapters were trained with")
        self.basis_path = basis_path
        self.basis_sha256 = file_sha256(basis_path)
        parameter = next(base_model.parameters())
        self.basis = cast_basis(Basis.load(basis_path), parameter.dtype, parameter.device)
        self._base_model = base_model
        self.model: PeftModel | None = None

    @property
    def adapter_names(self) -> list[str]:
        return [] if self.model is None else list(self.model.peft_config)

    def add(self, name: str, path: str | os.PathLike) -> None:
        """Load the compact adapter file ``path`` under ``name``; its frozen factor is a view of the shared basis."""
        target = self.model if self.model is not None else self._base_model
        self.model = load_compact_adapter(target, path, self.basis, adapter_name=name, basis_sha256=self.basis_sha256)
        self.model.eval()
        logger.info("loaded adapter %r from %s", name, path)

    def activate(self, name: str) -> PeftModel:
        """Make ``name`` the active adapter, frozen for inference, and return the model."""
        if self.model is None or name not in self.model.peft_config:
            raise KeyError(f"no adapter named {name!r}; loaded adapters: {self.adapter_names}")
        self.model.set_adapter(name, inference_mode=True)
        return self.model

    @torch.no_grad()
    def logits(self, name: str, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run adapter ``name`` on ``input_ids`` (batch, seq) and return logits (batch, seq, vocab)."""
        return self.activate(name)(input_ids=input_ids, **kwargs).logits

    @torch.no_grad()
    def generate(self, name: str, **kwargs: Any) -> torch.Tensor:
        """Generate with adapter ``name``; ``kwargs`` go to ``generate`` (input_ids, max_new_tokens, ...)."""
        return self.activate(name).generate(**kwargs)

    def frozen_factors(self, name: str) -> dict[str, torch.nn.Parameter]:
        """Return the frozen factor of adapter ``name`` per module: lora_B for side=output, lora_A for side=input."""
        if self.model is None:
            return {}
        record = self.model.cora_records[name]
        weight_name = record["frozen_weights"][0]
        return {
            module: getattr(layer, weight_name)[name].weight
            for module, layer in lora_layers(self.model).items()
            if name in getattr(layer, weight_name)
        }

    def shared_basis_bytes(self) -> int:
        """Bytes of the basis tensors, held once whatever the number of adapters."""
        return sum(factor.numel() * factor.element_size() for factor in self.basis.factors.values())


def load_task_adapters(
    base_model: Any, basis_path: str | os.PathLike, adapters: dict[str, str | os.PathLike]
) -> AdapterServer:
    """Load several compact task adapters onto one base model, sharing one copy of the basis.

    Args:
        base_model: a transformers causal LM.
        basis_path: the basis file the adapters were trained with.
        adapters: adapter name -> compact adapter file (``cora convert`` writes them).
    """
    if not adapters:
        raise ValueError("no adapters given; pass a mapping of adapter name to compact adapter file")
    server = AdapterServer(base_model, basis_path)
    for name, path in adapters.items():
        server.add(name, path)
    return server
