"""Held-out response loss on a tiny Llama: agreement with a per-example computation, padding, errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cora.data import Example
from cora.likelihood import response_loss
from cora.training import tokenize_example

EXAMPLES = [
    Example("What is the capital of France?", "Paris is the capital of France."),
    Example("Say hello.", "Hello."),
    Example("Count to five.", "One, two, three, four, five."),
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


def one_example_nll(model, tokenizer, example: Example) -> tuple[float, int]:
    """Summed NLL and token count of one example, unbatched, through the model's own loss."""
    row = tokenize_example(example, "alpaca", tokenizer, 1024)
    input_ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
    with torch.no_grad():
        mean = float(model(input_ids=input_ids, labels=labels).loss)
    tokens = int((labels[:, 1:] != -100).sum())
    return mean * tokens, tokens


def test_batched_loss_matches_unbatched_token_weighted_mean(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    parts = [one_example_nll(model, tokenizer, example) for example in EXAMPLES]
    expected = sum(nll for nll, _ in parts) / sum(tokens for _, tokens in parts)
    # Batch size 2 pads the shorter example of each batch; padding must not change the result.
    assert response_loss(model, tokenizer, EXAMPLES, "alpaca", batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert response_loss(model, tokenizer, EXAMPLES, "alpaca", batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_random_model_is_near_uniform_and_finite(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    loss = response_loss(model, tokenizer, EXAMPLES, "alpaca")
    # A random tiny model is close to uniform over its vocabulary: loss near log(vocab).
    assert math.isfinite(loss)
    assert abs(loss - math.log(model.config.vocab_size)) < 1.0


def test_prompt_filling_max_length_is_an_error(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="raise max_length"):
        response_loss(model, tokenizer, EXAMPLES, "alpaca", max_length=3)


def test_invalid_batch_size(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="invalid batch_size 0"):
        response_loss(model, tokenizer, EXAMPLES, "alpaca", batch_size=0)
