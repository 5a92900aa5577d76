"""Batched generation on a tiny real Llama, plain and with a PEFT LoRA adapter."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from cora.generation import GenerationConfig, StopOnSequences, generate_completions, truncate_at_stop

PROMPTS = ["def add(a, b):", "What is the capital of France?", "for i in range(10):\n    print(i"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_batched_greedy_equals_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = GenerationConfig(max_new_tokens=10, batch_size=3)
    batched = generate_completions(model, tokenizer, PROMPTS, config, progress=False)
    single = [generate_completions(model, tokenizer, [prompt], config, progress=False)[0] for prompt in PROMPTS]
    assert batched == single


def test_completion_excludes_prompt(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = GenerationConfig(max_new_tokens=6)
    completion = generate_completions(model, tokenizer, ["def add(a, b):"], config, progress=False)[0][0]
    inputs = tokenizer("def add(a, b):", return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert completion == expected


def test_stop_sequence_cuts_completion(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    free = generate_completions(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=12), progress=False)
    stop = next(character for character in free[0][0][1:] if character.strip())  # a character the text contains
    stopped = generate_completions(
        model, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=12, stop_sequences=(stop,)), progress=False
    )
    assert stopped[0][0] == free[0][0][: free[0][0].index(stop)]


def test_truncate_at_earliest_stop():
    assert truncate_at_stop("return x\ndef g():\n#", ("\n#", "\ndef ")) == "return x"


def test_sampling_returns_requested_count(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = GenerationConfig(max_new_tokens=8, do_sample=True, num_return_sequences=4, seed=1)
    completions = generate_completions(model, tokenizer, PROMPTS, config, progress=False)
    assert [len(texts) for texts in completions] == [4, 4, 4]
    assert len(set(completions[0])) > 1


def test_sampling_is_reproducible_with_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = GenerationConfig(max_new_tokens=8, do_sample=True, num_return_sequences=2, seed=3)
    first = generate_completions(model, tokenizer, PROMPTS, config, progress=False)
    second = generate_completions(model, tokenizer, PROMPTS, config, progress=False)
    assert first == second


def test_peft_model_generates_like_base_at_init(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = GenerationConfig(max_new_tokens=8)
    base = generate_completions(model, tokenizer, PROMPTS, config, progress=False)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model.name_or_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    assert generate_completions(peft_model, tokenizer, PROMPTS, config, progress=False) == base


def test_padding_side_restored(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    tokenizer.padding_side = "right"
    generate_completions(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=2), progress=False)
    assert tokenizer.padding_side == "right"


def test_greedy_with_several_sequences_rejected():
    with pytest.raises(ValueError, match="needs do_sample=True"):
        GenerationConfig(num_return_sequences=3)


def test_zero_max_new_tokens_rejected():
    with pytest.raises(ValueError, match="invalid max_new_tokens 0"):
        GenerationConfig(max_new_tokens=0)


def test_stop_criterion_ignores_prompt_text(tiny_tokenizer):
    """A stop sequence that begins in the prompt must not end the completion."""
    prompt_ids = tiny_tokenizer("def add(a, b):\n")["input_ids"]
    criterion = StopOnSequences(tiny_tokenizer, len(prompt_ids), ("\n#",))
    started = torch.tensor([prompt_ids + tiny_tokenizer("#")["input_ids"]])  # prompt's "\n" + new "#"
    finished = torch.tensor([prompt_ids + tiny_tokenizer("# x\n#")["input_ids"]])
    assert criterion(started, None).tolist() == [False]
    assert criterion(finished, None).tolist() == [True]
