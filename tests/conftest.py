"""Shared fixtures: tiny random-initialised transformers saved to disk as real checkpoints.

The models are real `transformers` models with real safetensors files and a real
byte-level BPE tokenizer trained here on a small corpus, so every test exercises
the same loading code that users run on Hub checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]

# Real text for the tokenizer: English prose and Python source.
TOKENIZER_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nWrite a function that adds two numbers.\n\n### Response:\n",
    "def add(a, b):\n    return a + b\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "import os\nimport sys\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n",
    "Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.",
    "What is the capital of France? The capital of France is Paris.",
    "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer (vocabulary of about 400) on the corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token=None
    )


def tiny_llama_config(vocab_size: int, num_key_value_heads: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def save_tiny_llama(
    directory: Path, tokenizer: PreTrainedTokenizerFast, num_key_value_heads: int, seed: int
) -> Path:
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), num_key_value_heads)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A Llama without grouped-query attention: q, k and v are all (64, 64)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer, num_key_value_heads=4, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_variant_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A second checkpoint of the same architecture with other weights (a second source model)."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama-variant"), tiny_tokenizer, num_key_value_heads=4, seed=1
    )


@pytest.fixture(scope="session")
def tiny_gqa_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A Llama with grouped-query attention: q is (64, 64), k and v are (32, 64)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-gqa-llama"), tiny_tokenizer, num_key_value_heads=2, seed=2)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Hub offline with an empty cache, and the current directory an empty folder."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    return tmp_path
