"""Where each supported architecture keeps its q, k and v projections.

One table, :data:`LAYOUTS`, maps a transformers ``model_type`` to the names of
the attention projections inside one decoder (or encoder) layer:

* separate projections (Llama, Mistral, Qwen2, Gemma, OLMo, BERT): one weight
  per role, already in PEFT layout ``(out, in)``;
* a fused projection (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, GPT-NeoX and Falcon
  ``query_key_value``): one weight whose output rows hold q, k and v. The rows
  of each role are given by :func:`fused_rows`, which reproduces the split that
  the model's own ``forward`` applies to the fused output.

A user can bypass the table with explicit module names (``--q-name`` and so on)
for an architecture that has separate projections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from cora.basis import ROLES


@dataclass(frozen=True)
class AttentionLayout:
    """Names of the q/k/v projections inside one layer, relative to the layer module."""

    modules: tuple[str, str, str] | None = None  # separate q, k, v module names, e.g. "self_attn.q_proj"
    fused: str | None = None  # one fused module holding q, k and v, e.g. "attn.c_attn"
    split: str | None = None  # how the fused rows split: concat, gpt_neox, falcon
    transposed: bool = False  # the stored weight is (in, out), as in GPT-2's Conv1D

    def __post_init__(self) -> None:
        if (self.modules is None) == (self.fused is None):
            raise ValueError("an attention layout names either three separate modules or one fused module")
        if self.fused is not None and self.split not in ("concat", "gpt_neox", "falcon"):
            raise ValueError(f"invalid fused split {self.split!r}; expected concat, gpt_neox or falcon")

    @property
    def module_names(self) -> tuple[str, ...]:
        """The modules whose weights are read: three separate ones or the fused one."""
        return self.modules if self.modules is not None else (self.fused,)

    def module_name(self, role: str) -> str:
        """Module name that a PEFT adapter targets for ``role``."""
        if self.modules is not None:
            return self.modules[ROLES.index(role)]
        return self.fused


_LLAMA_STYLE = AttentionLayout(modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
_BERT_STYLE = AttentionLayout(
    modules=("attention.self.query", "attention.self.key", "attention.self.value")
)

# model_type -> layout. Add an architecture here and in the registry tests.
LAYOUTS: dict[str, AttentionLayout] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
    "gemma3": _LLAMA_STYLE,
    "gemma3_text": _LLAMA_STYLE,
    "olmo": _LLAMA_STYLE,
    "olmo2": _LLAMA_STYLE,
    "phi3": AttentionLayout(fused="self_attn.qkv_proj", split="concat"),
    "gpt2": AttentionLayout(fused="attn.c_attn", split="concat", transposed=True),
    "gpt_neox": AttentionLayout(fused="attention.query_key_value", split="gpt_neox"),
    "falcon": AttentionLayout(fused="self_attention.query_key_value", split="falcon"),
    "bert": _BERT_STYLE,
    "roberta": _BERT_STYLE,
}

# Layer-list prefixes that belong to a vision tower, not to the language model.
_VISION_PREFIX = re.compile(r"vision|visual|image")


class UnsupportedArchitectureError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted(LAYOUTS)


def layout_for(model_type: str, module_names: tuple[str, str, str] | None = None) -> AttentionLayout:
    """Return the layout for ``model_type``, or the user's explicit q/k/v module names.

    Raises:
        UnsupportedArchitectureError: ``model_type`` is not in the table and no names were given.
    """
    if module_names is not None:
        return AttentionLayout(modules=tuple(module_names))
    if model_type in LAYOUTS:
        return LAYOUTS[model_type]
    raise UnsupportedArchitectureError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}. "
        "For another architecture with separate q, k and v projections, give their module names "
        "relative to one layer with --q-name, --k-name and --v-name (Python API: ExtractConfig.module_names), "
        "e.g. --q-name self_attn.q_proj --k-name self_attn.k_proj --v-name self_attn.v_proj"
    )


def find_layer_prefix(weight_names: list[str], module_name: str) -> tuple[str, list[int]]:
    """Find the layer-list prefix and layer indices of ``{prefix}.{i}.{module_name}.weight`` keys.

    Raises:
        ValueError: no key matches, or several language-model prefixes do.
    """
    pattern = re.compile(rf"^(?P<prefix>.+)\.(?P<index>\d+)\.{re.escape(module_name)}\.weight$")
    found: dict[str, set[int]] = {}
    for name in weight_names:
        match = pattern.match(name)
        if match:
            found.setdefault(match["prefix"], set()).add(int(match["index"]))
    if not found:
        example = ", ".join(sorted(weight_names)[:4])
        raise ValueError(
            f"no weight named '<prefix>.<layer>.{module_name}.weight' found (weights include {example}); "
            "check the architecture or pass the module names with --q-name/--k-name/--v-name"
        )
    language = {p: i for p, i in found.items() if not _VISION_PREFIX.search(p)} or found
    if len(language) > 1:
        raise ValueError(f"q/k/v weights found under several layer prefixes {sorted(language)}; expected one")
    prefix, indices = next(iter(language.items()))
    return prefix, sorted(indices)


def config_value(config: dict[str, Any], *names: str) -> Any:
    """First of ``names`` present in ``config`` or its ``text_config``."""
    for scope in (config, config.get("text_config") or {}):
        for name in names:
            if scope.get(name) is not None:
                return scope[name]
    raise KeyError(f"config has none of {names}")


def _head_counts(config: dict[str, Any]) -> tuple[int, int, int]:
    """Return (num_heads, num_kv_heads, head_dim) from a model config."""
    hidden = config_value(config, "hidden_size", "n_embd")
    heads = config_value(config, "num_attention_heads", "n_head")
    try:
        kv_heads = config_value(config, "num_key_value_heads", "num_kv_heads")
    except KeyError:
        kv_heads = heads
    try:
        head_dim = config_value(config, "head_dim")
    except KeyError:
        head_dim = hidden // heads
    return heads, kv_heads, head_dim


def _falcon_rows(config: dict[str, Any], head_dim: int, heads: int) -> dict[str, torch.Tensor]:
    # Mirrors FalconAttention._split_heads for its three layouts.
    if config.get("new_decoder_architecture"):
        kv_heads = config.get("num_kv_heads") or heads
        per_group = heads // kv_heads + 2  # query heads of the group, then one key and one value head
        slots = torch.arange(kv_heads * per_group).view(kv_heads, per_group)
        head_slots = {"q": slots[:, :-2].reshape(-1), "k": slots[:, -2], "v": slots[:, -1]}
    elif not config.get("multi_query", True):
        slots = torch.arange(heads * 3).view(heads, 3)  # per head: query, key, value
        head_slots = {"q": slots[:, 0], "k": slots[:, 1], "v": slots[:, 2]}
    else:
        head_slots = {"q": torch.arange(heads), "k": torch.tensor([heads]), "v": torch.tensor([heads + 1])}
    offsets = torch.arange(head_dim)
    return {role: (slots[:, None] * head_dim + offsets).reshape(-1) for role, slots in head_slots.items()}


def fused_rows(layout: AttentionLayout, config: dict[str, Any], fused_out: int) -> dict[str, torch.Tensor]:
    """Row indices of q, k and v in a fused weight of PEFT layout ``(fused_out, in)``.

    ``weight[rows["q"]]`` is the q projection exactly as the model's forward splits it.
    """
    heads, kv_heads, head_dim = _head_counts(config)
    if layout.split == "concat":
        q_out = heads * head_dim
        kv_out = (fused_out - q_out) // 2
        bounds = (0, q_out, q_out + kv_out, fused_out)
        rows = {role: torch.arange(bounds[i], bounds[i + 1]) for i, role in enumerate(ROLES)}
    elif layout.split == "gpt_neox":
        # GPTNeoXAttention views the output as (heads, 3 * head_dim) and chunks the last axis.
        slots = torch.arange(heads * 3 * head_dim).view(heads, 3, head_dim)
        rows = {role: slots[:, i].reshape(-1) for i, role in enumerate(ROLES)}
    else:
        rows = _falcon_rows(config, head_dim, heads)
    covered = sum(len(r) for r in rows.values())
    if covered != fused_out:
        raise ValueError(
            f"fused q/k/v weight has {fused_out} output rows but the config's heads give {covered}; "
            "the config does not match the checkpoint"
        )
    return rows


def split_fused(
    layout: AttentionLayout, weight: torch.Tensor, rows: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Split a fused weight into q, k, v in PEFT layout ``(out, in)``."""
    if layout.transposed:
        weight = weight.T  # Conv1D stores (in, 3 * out)
    return {role: weight[rows[role]] for role in ROLES}
