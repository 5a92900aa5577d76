"""Base-model loading: local folders, GGUF conversion and model specs."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors import safe_open

from cora.models import (
    hub_address,
    hub_reachable,
    load_base_model,
    resolve_dtype,
    resolve_model_path,
    smollm2_gguf_path,
    split_revision,
)


def test_load_local_folder_returns_model_and_tokenizer(tiny_llama_dir):
    model, tokenizer = load_base_model(str(tiny_llama_dir))
    assert model.config.num_hidden_layers == 2
    assert tokenizer.pad_token == "<|pad|>"


def test_tokenizer_without_pad_gets_eos(tiny_llama_dir, tmp_path):
    folder = tmp_path / "no-pad"
    folder.mkdir()
    for item in tiny_llama_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    _, tokenizer = load_base_model(str(folder))
    assert tokenizer.pad_token == tokenizer.eos_token


def test_load_base_model_applies_dtype(tiny_llama_dir):
    model, _ = load_base_model(str(tiny_llama_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_resolve_dtype_rejects_unknown_name():
    with pytest.raises(ValueError, match="invalid dtype 'float8'"):
        resolve_dtype("float8")


def test_split_revision_of_hub_id():
    assert split_revision("HuggingFaceTB/SmolLM2-135M-Instruct@main") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "main")


def test_split_revision_of_plain_id():
    assert split_revision("org/model") == ("org/model", None)


def test_folder_without_config_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_non_gguf_file_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match="a file that is not .gguf"):
        resolve_model_path(str(path))


def test_smollm2_gguf_converts_to_cached_safetensors(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF (about 20 s): dequantised, saved once, and loaded without its quantisation mark."""
    monkeypatch.setenv("CORA_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    folder = resolve_model_path("smollm2")
    assert folder.startswith(str(tmp_path))
    config = json.loads((tmp_path / folder / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(f"{folder}/model.safetensors", framework="pt") as reader:
        assert reader.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert resolve_model_path(str(smollm2_gguf_path())) == folder  # the second call reuses the cache

    model, tokenizer = load_base_model("smollm2")
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.num_hidden_layers == 30
    assert tokenizer.pad_token is not None


def test_hub_address_follows_hf_endpoint(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:8123/mirror")
    assert hub_address() == ("127.0.0.1", 8123)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.com")
    assert hub_address() == ("hf-mirror.example.com", 443)
    monkeypatch.delenv("HF_ENDPOINT")
    assert hub_address() == ("huggingface.co", 443)


def test_hub_reachable_probes_the_mirror(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_reachable(timeout=1.0)
    # The socket is closed now, so nothing listens on the port.
    assert not hub_reachable(timeout=1.0)


def test_invalid_hf_endpoint_is_an_error(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "hf-mirror.example.com")
    with pytest.raises(ValueError, match="invalid HF_ENDPOINT 'hf-mirror.example.com'"):
        hub_address()
