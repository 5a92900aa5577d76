"""The architecture registry: q/k/v read from disk equal what each real model computes."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from cora.architectures import UnsupportedArchitectureError, layout_for
from cora.extract import ExtractConfig, QKVReader, extract_basis
from cora.sources import SafetensorsSource

ROLES = ("q", "k", "v")
SMALL = dict(vocab_size=64, num_hidden_layers=2, max_position_embeddings=32)


def llama_like(config_class: str, model_class: str, **extra):
    def build():
        config = getattr(transformers, config_class)(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **SMALL, **extra
        )
        return getattr(transformers, model_class)(config)

    return build


SEPARATE = {
    "llama": llama_like("LlamaConfig", "LlamaForCausalLM"),
    "mistral": llama_like("MistralConfig", "MistralForCausalLM"),
    "qwen2": llama_like("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma2": llama_like("Gemma2Config", "Gemma2ForCausalLM", head_dim=16),
    "gemma3_text": llama_like("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=24),  # heads * head_dim != hidden
    "olmo": llama_like("OlmoConfig", "OlmoForCausalLM"),
    "bert": lambda: transformers.BertModel(
        transformers.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=64,
                                num_hidden_layers=2, max_position_embeddings=32)
    ),
}

FUSED = {
    "phi3": llama_like("Phi3Config", "Phi3ForCausalLM", pad_token_id=0),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=32, vocab_size=64)
    ),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, **SMALL)
    ),
}

FALCON = {
    "new_decoder_architecture": dict(new_decoder_architecture=True, num_kv_heads=2),
    "multi_query": dict(new_decoder_architecture=False, multi_query=True),
    "per_head_qkv": dict(new_decoder_architecture=False, multi_query=False),
}


def save(model, directory):
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("model_type", sorted(SEPARATE))
def test_separate_projections_equal_parameters(tmp_path, model_type):
    torch.manual_seed(0)
    model = SEPARATE[model_type]()
    reader = QKVReader(SafetensorsSource(save(model, tmp_path)))
    assert reader.model_type == model_type
    layer = model.get_submodule(reader.layer_prefix)[1]

    weights = reader.read_layer(1)
    for role in ROLES:
        expected = layer.get_submodule(reader.layout.module_name(role)).weight.detach()
        torch.testing.assert_close(weights[role], expected, atol=0, rtol=0, msg=f"{model_type} {role}")


def test_gemma3_query_width_follows_head_dim(tmp_path):
    torch.manual_seed(0)
    reader = QKVReader(SafetensorsSource(save(SEPARATE["gemma3_text"](), tmp_path)))
    weights = reader.read_layer(0)
    assert weights["q"].shape == (4 * 24, 32)
    assert weights["k"].shape == (2 * 24, 32)


class CapturedAttention:
    """An attention function that records q, k and v as the model passes them to attention."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls.append((query.detach(), key.detach(), value.detach()))  # (B, heads, T, head_dim)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def heads_view(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, heads * head_dim) -> (B, heads, T, head_dim)."""
    batch, length, width = states.shape
    return states.view(batch, length, width // head_dim, head_dim).transpose(1, 2)


@pytest.mark.parametrize("model_type", sorted(FUSED))
def test_fused_split_equals_forward_qkv(tmp_path, model_type):
    torch.manual_seed(0)
    capture = CapturedAttention()
    AttentionInterface.register("cora_capture", capture)
    model = FUSED[model_type]().eval()
    reader = QKVReader(SafetensorsSource(save(model, tmp_path)))
    model.set_attn_implementation("cora_capture")

    fused = model.get_submodule(f"{reader.layer_prefix}.1.{reader.layout.fused}")
    inputs = []
    fused.register_forward_hook(lambda module, args, output: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5], [9]]))  # one position, so rotary embeddings are the identity
    query, key, value = capture.calls[1]

    weights = reader.read_layer(1)
    rows = reader._rows
    bias = fused.bias.detach() if fused.bias is not None else torch.zeros(max(r.max() for r in rows.values()) + 1)
    head_dim = query.shape[-1]
    for role, observed in zip(ROLES, (query, key, value)):
        expected = heads_view(inputs[0] @ weights[role].T + bias[rows[role]], head_dim)
        torch.testing.assert_close(observed, expected, atol=1e-5, rtol=1e-5, msg=f"{model_type} {role}")


@pytest.mark.parametrize("variant", sorted(FALCON))
def test_falcon_split_equals_split_heads(tmp_path, variant):
    torch.manual_seed(0)
    config = transformers.FalconConfig(hidden_size=32, num_attention_heads=4, vocab_size=64,
                                       num_hidden_layers=2, **FALCON[variant])
    model = transformers.FalconForCausalLM(config).eval()
    reader = QKVReader(SafetensorsSource(save(model, tmp_path)))
    attention = model.get_submodule(f"{reader.layer_prefix}.0.self_attention")
    hidden = torch.randn(2, 3, 32)

    with torch.no_grad():
        query, key, value = attention._split_heads(attention.query_key_value(hidden))  # (B, T, heads, head_dim)
    weights = reader.read_layer(0)
    for role, observed in zip(ROLES, (query, key, value)):
        projected = (hidden @ weights[role].T).view(2, 3, -1, 8)
        expected = projected.repeat_interleave(observed.shape[2] // projected.shape[2], dim=2)
        torch.testing.assert_close(observed, expected, atol=1e-5, rtol=1e-5, msg=f"falcon {variant} {role}")


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "phi3"])
def test_fused_metadata_names_module_and_rows(tmp_path, model_type):
    torch.manual_seed(0)
    directory = save(FUSED[model_type](), tmp_path)
    basis = extract_basis(ExtractConfig(models=(str(directory),), rank=2, group="module", show_progress=False))
    metadata = basis.metadata
    assert metadata.fused_module == layout_for(model_type).fused
    assert all(m.name == metadata.fused_module for m in metadata.modules)
    rows = sorted(r for role in ROLES for r in metadata.fused_rows[role])
    assert rows == list(range(len(rows)))
    assert len(metadata.fused_rows["q"]) == metadata.module("q").shape[0]


def opt_model():
    config = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                                    **SMALL)
    return transformers.OPTForCausalLM(config)


def test_unsupported_architecture_lists_supported(tmp_path):
    directory = save(opt_model(), tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=r"unsupported model_type 'opt'; supported: bert, falcon"):
        extract_basis(ExtractConfig(models=(str(directory),), rank=2, show_progress=False))


def test_unsupported_architecture_error_explains_names():
    with pytest.raises(UnsupportedArchitectureError, match=r"--q-name, --k-name and --v-name"):
        layout_for("opt")


def test_explicit_module_names_read_unlisted_architecture(tmp_path):
    torch.manual_seed(0)
    model = opt_model()
    directory = save(model, tmp_path)
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    basis = extract_basis(
        ExtractConfig(models=(str(directory),), rank=2, module_names=names, side="input", show_progress=False)
    )
    assert basis.metadata.layer_prefix == "model.decoder.layers"
    matrix = torch.cat([model.model.decoder.layers[1].self_attn.get_submodule(n.split(".")[1]).weight.detach()
                        for n in names]).double()  # (3 * out, in)
    _, _, vh = torch.linalg.svd(matrix)
    overlap = torch.linalg.svdvals(vh[:2] @ basis.factors["layers.1.qkv"].double())
    torch.testing.assert_close(overlap, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)


def test_cli_accepts_explicit_module_names(tmp_path):
    from cora.basis import Basis
    from cora.cli import main

    directory = save(opt_model(), tmp_path / "opt")
    output = tmp_path / "basis.safetensors"
    code = main(["extract", str(directory), "--rank", "2", "--side", "input", "--q-name", "self_attn.q_proj",
                 "--k-name", "self_attn.k_proj", "--v-name", "self_attn.v_proj", "-o", str(output)])
    assert code == 0
    assert Basis.load(output).metadata.modules[2].name == "self_attn.v_proj"


def test_cli_rejects_partial_module_names(tmp_path, capsys):
    from cora.cli import main

    directory = save(opt_model(), tmp_path / "opt")
    code = main(["extract", str(directory), "--rank", "2", "--q-name", "self_attn.q_proj", "-o", str(tmp_path / "b")])
    assert code == 2
    assert "give all three of --q-name, --k-name and --v-name" in capsys.readouterr().err


# --- an adapter built on each architecture's basis trains --------------------------------------------------


def bert_masked_lm():
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=64,
                                     num_hidden_layers=2, max_position_embeddings=32)
    return transformers.BertForMaskedLM(config)


def falcon_lm():
    config = transformers.FalconConfig(hidden_size=32, num_attention_heads=4, vocab_size=64, num_hidden_layers=2,
                                       new_decoder_architecture=True, num_kv_heads=2)
    return transformers.FalconForCausalLM(config)


# model_type -> a tiny model with a language-model head; "gemma3_text" is Gemma 3's text model.
WITH_LM_HEAD = {**{t: b for t, b in SEPARATE.items() if t != "bert"}, **FUSED, "bert": bert_masked_lm,
                "falcon": falcon_lm}


def train_steps(model, steps: int = 2) -> list[float]:
    """A few Adam steps on a fixed batch, with the tokens as labels (causal or masked LM loss)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[3, 17, 42, 9, 28, 5, 61, 11]])
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("model_type", sorted(WITH_LM_HEAD))
def test_adapter_on_extracted_basis_trains(tmp_path, model_type):
    from cora.adapters import AdapterConfig, build_cora_model, lora_layers

    torch.manual_seed(0)
    directory = save(WITH_LM_HEAD[model_type](), tmp_path / "model")
    basis = extract_basis(ExtractConfig(models=(str(directory),), rank=2, side="output", group="module",
                                        show_progress=False))
    model = transformers.AutoModelForMaskedLM if model_type == "bert" else transformers.AutoModelForCausalLM
    peft_model = build_cora_model(model.from_pretrained(directory), basis, AdapterConfig(mode="frozen"))
    layers = lora_layers(peft_model)
    free = {name: layer.lora_A["default"].weight.detach().clone() for name, layer in layers.items()}
    frozen = {name: layer.lora_B["default"].weight.detach().clone() for name, layer in layers.items()}

    losses = train_steps(peft_model)

    assert len(layers) == 2 * (1 if basis.metadata.fused_module else 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, layer in layers.items():
        assert not torch.equal(layer.lora_A["default"].weight, free[name]), f"{name}: lora_A did not change"
        assert torch.equal(layer.lora_B["default"].weight, frozen[name]), f"{name}: frozen lora_B changed"
