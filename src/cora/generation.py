"""Batched text generation for evaluation: greedy by default, sampling for pass@k.

Prompts are sorted by length and left-padded in batches, so every row of a
batch ends at the same position and new tokens start together. Generation of a
row stops at the tokenizer's EOS or at a stop sequence (for code, the start of
the next top-level statement); the text from the stop sequence on is cut off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

logger = logging.getLogger(__name__)

# Stop sequences per prompt template. `completion` continues a function body
# (HumanEval style), so the first unindented line ends it. `code` writes whole
# functions (MBPP style), so only test code or a new task ends it.
STOP_SEQUENCES = {
    "alpaca": ("\n### Instruction:", "\n### Input:", "\n### Response:"),
    "code": ('\n"""', "\nassert ", "\nif __name__", "\nprint(", "\n# Test"),
    "completion": ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#"),
    "chat": (),
}


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings for :func:`generate_completions`."""

    max_new_tokens: int = 256  # tokens generated per completion, at most
    batch_size: int = 8  # prompts per forward pass
    stop_sequences: tuple[str, ...] = ()  # a completion ends before the first of these
    do_sample: bool = False  # False: greedy decoding
    temperature: float = 0.8  # sampling temperature, used when do_sample
    top_p: float = 0.95  # nucleus sampling mass, used when do_sample
    num_return_sequences: int = 1  # completions per prompt (pass@k sampling needs n > 1)
    seed: int = 0  # torch seed set before sampling

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences))
        for name in ("max_new_tokens", "batch_size", "num_return_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {name} {value!r}; expected a positive integer")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"invalid temperature {self.temperature}; sampling needs a value above 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"invalid top_p {self.top_p}; expected a value in (0, 1]")
        if not self.do_sample and self.num_return_sequences > 1:
            raise ValueError(
                f"num_return_sequences {self.num_return_sequences} needs do_sample=True; greedy decoding "
                "returns the same completion every time"
            )
        if any(not stop for stop in self.stop_sequences):
            raise ValueError("invalid empty stop sequence; remove it")


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def truncate_at_stop(text: str, stop_sequences: tuple[str, ...]) -> str:
    """Cut ``text`` at the earliest stop sequence it contains."""
    end = len(text)
    for stop in stop_sequences:
        position = text.find(stop)
        if position != -1:
            end = min(end, position)
    return text[:end]


def generate_completions(
    model: Any, tokenizer: Any, prompts: list[str], config: GenerationConfig | None = None, progress: bool = True
) -> list[list[str]]:
    """Generate ``config.num_return_sequences`` completions for each prompt.

    Args:
        model: a causal LM (plain transformers or PEFT), on the device to run on.
        tokenizer: its tokenizer; without a pad token, its EOS token becomes the pad token.
        prompts: texts the completions continue.
        progress: show a tqdm progress bar over batches.

    Returns:
        One list of completions per prompt, in prompt order, without the prompt
        and with stop sequences cut off.
    """
    config = config or GenerationConfig()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    if config.do_sample:
        torch.manual_seed(config.seed)

    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]), reverse=True)
    completions: list[list[str]] = [[] for _ in prompts]
    batches = [order[start : start + config.batch_size] for start in range(0, len(order), config.batch_size)]
    model.eval()
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        texts = _generate_batch(model, tokenizer, [prompts[index] for index in batch], config)
        for position, index in enumerate(batch):
            start = position * config.num_return_sequences
            completions[index] = texts[start : start + config.num_return_sequences]
    return completions


class StopOnSequences(StoppingCriteria):
    """Stop each row once its generated text contains a stop sequence.

    ``generate(stop_strings=...)`` also matches a stop sequence that starts inside
    the prompt, so this criterion decodes only the new tokens. For example, a prompt
    that ends with a newline followed by a first token ``#`` would match ``"\n#"``
    and end the completion before it begins.
    """

    def __init__(self, tokenizer: Any, prompt_length: int, stop_sequences: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stop_sequences = stop_sequences

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_sequences) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # (batch,)


def _generate_batch(model: Any, tokenizer: Any, prompts: list[str], config: GenerationConfig) -> list[str]:
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(model_device(model))
    finally:
        tokenizer.padding_side = padding_side
    prompt_length = encoded["input_ids"].shape[1]  # (batch, prompt_length), left-padded

    options: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "do_sample": config.do_sample,
        "num_return_sequences": config.num_return_sequences,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if config.do_sample:
        options.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)  # silence sampling defaults of the checkpoint
    if config.stop_sequences:
        criterion = StopOnSequences(tokenizer, prompt_length, config.stop_sequences)
        options.update(stopping_criteria=StoppingCriteriaList([criterion]))

    with torch.inference_mode():
        output = model.generate(**encoded, **options)  # (batch * num_return_sequences, prompt_length + new)
    new_tokens = output[:, prompt_length:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [truncate_at_stop(text, config.stop_sequences) for text in texts]
