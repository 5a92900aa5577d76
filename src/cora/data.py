"""Task data: loading prompt/response examples, held-out splits and prompt formatting.

Every supported source becomes a list of :class:`Example` (a prompt and the
reference response). Training and evaluation share :func:`split_examples`, so the
held-out part that ``cora evaluate`` scores is never seen by ``cora train``.

Supported row layouts, detected from the fields of the first row:

* Alpaca style: ``instruction``, optional ``input``, ``output`` (or ``response``).
* Self-Instruct style: ``instruction`` and ``instances``, a list of ``{input, output}``.
* MBPP style: ``text`` (or ``prompt``), ``code``, optional ``test_list``.
* HumanEval style: ``prompt`` (signature and docstring), ``canonical_solution``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMPLATES = ("alpaca", "code", "completion", "chat")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One task example: what the model reads and the reference it should produce."""

    instruction: str  # the task in words (Alpaca instruction, MBPP text, HumanEval docstring prompt)
    response: str  # reference output: an answer or code
    input: str = ""  # optional context (Alpaca input)
    tests: tuple[str, ...] = ()  # executable checks for code tasks (MBPP assert lines, HumanEval check)
    task_id: str = ""  # stable identifier of the row in its source
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class DataConfig:
    """Source of the examples and the choice of the held-out part."""

    path: str  # JSON/JSONL(.gz) file, or a Hub dataset id ("hub:ID" or an id that is not a local path)
    split: str = "train"  # Hub dataset split to read
    eval_fraction: float = 0.1  # fraction of examples held out for evaluation
    eval_size: int | None = None  # held-out size; overrides eval_fraction when set
    max_examples: int | None = None  # cap on examples read, after shuffling with `seed`
    seed: int = 0  # seed of the deterministic split

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"invalid eval_fraction {self.eval_fraction}; expected a value in (0, 1)")
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(f"invalid eval_size {self.eval_size}; expected a positive integer")
        if self.max_examples is not None and self.max_examples < 2:
            raise ValueError(f"invalid max_examples {self.max_examples}; expected at least 2")


def read_rows(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Read raw rows from a JSON array, JSON lines (optionally gzipped) or a Hub dataset id."""
    local = Path(path)
    if path.startswith("hub:") or not (local.exists() or local.suffix in {".json", ".jsonl", ".gz"}):
        return _read_hub_rows(path.removeprefix("hub:"), split)
    if not local.is_file():
        raise FileNotFoundError(f"data file not found: {path}; pass a JSON or JSONL file or a Hub dataset id")

    opener = gzip.open if local.suffix == ".gz" else open
    with opener(local, "rt", encoding="utf-8") as stream:
        text = stream.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}; "
                "expected a JSON array of rows"
            ) from None
    else:
        rows = _parse_json_lines(text, path)
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path} contains no JSON objects; expected a list of rows or one JSON object per line")
    return rows


def _parse_json_lines(text: str, path: str) -> list[Any]:
    """Parse one JSON value per line, naming the file and line of the first bad one."""
    rows = []
    # Split on "\n" only: str.splitlines also breaks at characters such as U+2028 that JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} line {number} is not valid JSON: {error.msg} at column {error.colno}; "
                "expected one JSON object per line"
            ) from None
    return rows


def _read_hub_rows(dataset_id: str, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(dataset_id, split=split)
    except Exception as error:  # datasets raises many types for an unreachable Hub or a bad id
        raise FileNotFoundError(
            f"could not load dataset {dataset_id!r} (split {split!r}) from the Hugging Face Hub: {error}; "
            "check the id and network access, or pass a local JSON/JSONL file"
        ) from error
    return [dict(row) for row in dataset]


def row_to_example(row: dict[str, Any], index: int) -> Example:
    """Convert one raw row to an :class:`Example`, detecting its layout from its fields."""
    task_id = str(row.get("task_id", row.get("id", index)))
    if "instruction" in row and row.get("instances"):
        # Self-Instruct style: one instruction with a list of {input, output} instances.
        # NOTE: only the first instance is used; the user-oriented eval set has one per row.
        instance = row["instances"][0]
        return Example(
            str(row["instruction"]), str(instance["output"]), input=str(instance.get("input") or ""), task_id=task_id
        )
    if "instruction" in row and ("output" in row or "response" in row):
        response = row.get("output", row.get("response"))
        return Example(str(row["instruction"]), str(response), input=str(row.get("input") or ""), task_id=task_id)
    if "code" in row and ("text" in row or "prompt" in row):
        tests = tuple(row.get("test_list") or ())
        setup = row.get("test_setup_code") or "\n".join(row.get("test_imports") or ())
        return Example(
            str(row.get("text", row.get("prompt"))),
            str(row["code"]),
            tests=tests,
            task_id=task_id,
            extra={"test_setup_code": setup} if setup else {},
        )
    if "prompt" in row and "canonical_solution" in row:
        # The prompt's trailing newline moves to the start of the response. Byte-level BPE
        # tokenizers merge a newline with the indentation after it, so a prompt that ends in a
        # lone newline token leaves the model a token sequence it has rarely seen.
        # instruction + response is still the original program text.
        prompt = str(row["prompt"])
        header = prompt.rstrip()
        return Example(
            header,
            prompt[len(header) :] + str(row["canonical_solution"]),
            tests=(str(row["test"]),),
            task_id=task_id,
            extra={"entry_point": row.get("entry_point", "")},
        )
    raise ValueError(
        f"row {index} has fields {sorted(row)}; expected Alpaca (instruction, input, output), "
        "MBPP (text, code, test_list) or HumanEval (prompt, canonical_solution) fields"
    )


def load_examples(path: str, split: str = "train") -> list[Example]:
    rows = read_rows(path, split)
    examples = [row_to_example(row, index) for index, row in enumerate(rows)]
    logger.info("loaded %d examples from %s", len(examples), path)
    return examples


def _shuffle_key(example: Example, seed: int) -> str:
    # A content hash, not random.shuffle: the split stays the same when rows are appended.
    text = f"{seed}\x00{example.task_id}\x00{example.instruction}\x00{example.input}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_examples(examples: list[Example], config: DataConfig) -> tuple[list[Example], list[Example]]:
    """Split deterministically into (train, held_out) without overlap.

    Rows that share a prompt (instruction and input) go to the same side, so no
    held-out prompt is seen in training: whole prompt groups are held out, in
    shuffled order, until the held-out size is reached. The held-out part can
    therefore be larger than ``eval_size`` or ``eval_fraction`` requests.

    Raises:
        ValueError: the held-out size, or the prompt groups it takes, leave no training rows.
    """
    ordered = sorted(examples, key=lambda example: _shuffle_key(example, config.seed))
    if config.max_examples is not None:
        ordered = ordered[: config.max_examples]
    held_out_size = config.eval_size or max(1, round(len(ordered) * config.eval_fraction))
    if held_out_size >= len(ordered):
        raise ValueError(
            f"held-out size {held_out_size} leaves no training examples out of {len(ordered)}; "
            "lower eval_size or eval_fraction"
        )

    groups: dict[tuple[str, str], list[Example]] = {}  # prompt -> its rows, in order of first appearance
    for example in ordered:
        groups.setdefault((example.instruction, example.input), []).append(example)
    held_out, train = [], []
    for rows in groups.values():
        (held_out if len(held_out) < held_out_size else train).extend(rows)

    if not train:
        raise ValueError(
            f"all {len(ordered)} rows share {len(groups)} prompt(s), so the duplicate-prompt rule "
            f"(rows with one prompt stay on one side) holds out every row to reach the held-out size "
            f"{held_out_size} and leaves no training rows; add rows with other prompts"
        )
    if len(held_out) > held_out_size:
        logger.warning(
            "held out %d rows instead of %d: %d more rows share a prompt with a held-out row and stay with it",
            len(held_out), held_out_size, len(held_out) - held_out_size,
        )
    return train, held_out


def format_prompt(example: Example, template: str, tokenizer: Any = None) -> str:
    """Render the text the model reads before its response.

    Args:
        template: ``alpaca`` (Alpaca's prompt), ``code`` (the task text, then a
            ``# Solution:`` line; MBPP style), ``completion`` (the prompt
            verbatim; HumanEval style, the model continues the function) or
            ``chat`` (the tokenizer's chat template with a user turn).
    """
    if template == "alpaca":
        if example.input:
            return ALPACA_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return ALPACA_NO_INPUT.format(instruction=example.instruction)
    if template == "code":
        tests = "\n".join(example.tests[:1])
        hint = f"\nYour code should pass this test:\n{tests}\n" if tests else "\n"
        return f"\"\"\"\n{example.instruction.strip()}{hint}\"\"\"\n# Solution:\n"
    if template == "completion":
        return example.instruction
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template; use 'alpaca' or 'code'")
        content = example.instruction if not example.input else f"{example.instruction}\n\n{example.input}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"invalid template {template!r}; expected one of {TEMPLATES}")
