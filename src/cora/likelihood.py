"""Held-out loss: the negative log-likelihood of reference responses under a model.

Generation metrics on a few dozen examples are noisy. The teacher-forced loss of
the reference responses measures the same fit with far less variance, and it
costs one forward pass per batch. It uses the tokenisation of training
(:func:`cora.training.tokenize_example`): the prompt is context, and the loss
covers the response tokens and the closing EOS.

    examples --tokenize_example--> (input_ids, labels) --forward--> summed NLL / response tokens
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from cora.data import Example

logger = logging.getLogger(__name__)

RESPONSE_LOSS_NAME = "response_nll"  # metric name in metrics.json and the result tables


def response_loss(
    model: Any, tokenizer: Any, examples: list[Example], template: str, max_length: int = 1024, batch_size: int = 8
) -> float:
    """Return the mean negative log-likelihood (nats) per response token over ``examples``.

    Every response token counts once, so long responses weigh more than short ones,
    as in the training loss. Examples whose prompt fills ``max_length`` are skipped.

    Args:
        model: causal LM (plain or PEFT), already on its device.
        template: prompt template for :func:`cora.data.format_prompt`.
        max_length: tokens per example, prompt included; longer examples are cut.
        batch_size: examples per forward pass.
    """
    from cora.training import IGNORE_INDEX, tokenize_example

    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}; expected a positive integer")
    rows = [tokenize_example(example, template, tokenizer, max_length) for example in examples]
    rows = [row for row in rows if row is not None]
    if not rows:
        raise ValueError(f"no example has a response token within max_length {max_length}; raise max_length")

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            input_ids, attention_mask, labels = _pad_batch(rows[start : start + batch_size], pad_id, IGNORE_INDEX)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            # Position t predicts token t + 1.
            shifted_logits = logits[:, :-1].float()  # (batch, length - 1, vocab)
            shifted_labels = labels[:, 1:].to(device)  # (batch, length - 1)
            nll = torch.nn.functional.cross_entropy(
                shifted_logits.reshape(-1, shifted_logits.shape[-1]),
                shifted_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += int((shifted_labels != IGNORE_INDEX).sum())
    loss = total_nll / total_tokens
    if not math.isfinite(loss):
        raise ValueError(f"response loss is {loss}; the model produced non-finite logits")
    logger.info("response loss %.4f nats per token over %d tokens of %d examples", loss, total_tokens, len(rows))
    return loss


def _pad_batch(rows: list[dict[str, list[int]]], pad_id: int, ignore_index: int) -> tuple[torch.Tensor, ...]:
    """Right-pad a batch: returns input_ids, attention_mask and labels, each (batch, longest)."""
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), ignore_index, dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[index, :length] = torch.tensor(row["input_ids"])
        attention_mask[index, :length] = 1
        labels[index, :length] = torch.tensor(row["labels"])
    return input_ids, attention_mask, labels
