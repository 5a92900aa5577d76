"""Task data: row layouts, the deterministic held-out split and prompt templates."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from cora.data import DataConfig, Example, format_prompt, load_examples, read_rows, row_to_example, split_examples
from test_training import ALPACA_ROWS, MBPP_ROWS, write_jsonl

HUMANEVAL_ROW = {
    "task_id": "HumanEval/0",
    "prompt": "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
    "entry_point": "add",
}


def test_alpaca_row_with_input():
    example = row_to_example(ALPACA_ROWS[3], 3)
    assert example.input == "The fox jumps over the dog."
    assert example.response == "The dog is jumped over by the fox."


def test_mbpp_row_keeps_tests():
    example = row_to_example(MBPP_ROWS[0], 0)
    assert example.tests == ("assert add(1, 2) == 3",)
    assert example.task_id == "1"


def test_humaneval_row_keeps_entry_point():
    example = row_to_example(HUMANEVAL_ROW, 0)
    assert example.extra["entry_point"] == "add"
    assert example.response == "\n    return a + b\n"


def test_humaneval_row_moves_trailing_newline_to_response():
    example = row_to_example(HUMANEVAL_ROW, 0)
    assert example.instruction == HUMANEVAL_ROW["prompt"].rstrip()
    assert example.instruction + example.response == HUMANEVAL_ROW["prompt"] + HUMANEVAL_ROW["canonical_solution"]


def test_unknown_row_layout_rejected():
    with pytest.raises(ValueError, match=r"row 0 has fields \['question'\]; expected Alpaca"):
        row_to_example({"question": "why?"}, 0)


def test_json_array_and_jsonl_read_alike(tmp_path):
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ALPACA_ROWS))
    lines = write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS)
    assert read_rows(str(array)) == read_rows(lines)


def test_gzipped_jsonl_is_read(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.write(json.dumps(HUMANEVAL_ROW) + "\n")
    assert load_examples(str(path))[0].task_id == "HumanEval/0"


def test_missing_local_file_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_rows(str(tmp_path / "absent.jsonl"))


def test_split_is_deterministic_and_disjoint():
    examples = [row_to_example(row, i) for i, row in enumerate(ALPACA_ROWS)]
    config = DataConfig(path="unused", eval_size=2, seed=3)
    train, held_out = split_examples(examples, config)
    again_train, again_held_out = split_examples(list(reversed(examples)), config)
    assert held_out == again_held_out
    assert train == again_train
    assert len(held_out) == 2
    assert not set(train) & set(held_out)


def test_duplicate_prompts_stay_on_one_side():
    examples = [Example("Same question?", f"answer {i}", task_id=str(i)) for i in range(3)]
    examples += [Example(f"Question {i}?", "answer", task_id=f"q{i}") for i in range(5)]
    train, held_out = split_examples(examples, DataConfig(path="unused", eval_size=1))
    train_prompts = {example.instruction for example in train}
    assert not train_prompts & {example.instruction for example in held_out}


def test_split_leaving_no_training_rejected():
    examples = [row_to_example(row, i) for i, row in enumerate(ALPACA_ROWS[:2])]
    with pytest.raises(ValueError, match="leaves no training examples"):
        split_examples(examples, DataConfig(path="unused", eval_size=2))


def test_split_with_one_shared_prompt_names_the_duplicate_rule():
    examples = [Example("Same question?", f"answer {i}", task_id=str(i)) for i in range(10)]
    with pytest.raises(ValueError, match=r"all 10 rows share 1 prompt\(s\), so the duplicate-prompt rule"):
        split_examples(examples, DataConfig(path="unused"))


def test_split_holds_out_whole_prompt_groups_near_the_fraction():
    # 40 rows over 6 prompts: 10% requests 4 rows; one group of 6 or 7 rows is held out, not half the file.
    examples = [Example(f"Question {i % 6}?", f"answer {i}", task_id=str(i)) for i in range(40)]
    train, held_out = split_examples(examples, DataConfig(path="unused"))
    assert len({example.instruction for example in held_out}) == 1
    assert len(train) + len(held_out) == 40


def test_split_logs_rows_moved_by_duplicate_prompts(caplog):
    examples = [Example(f"Question {i % 6}?", f"answer {i}", task_id=str(i)) for i in range(40)]
    with caplog.at_level(logging.WARNING, logger="cora.data"):
        _, held_out = split_examples(examples, DataConfig(path="unused"))
    assert f"held out {len(held_out)} rows instead of 4" in caplog.text


def test_invalid_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ALPACA_ROWS[0]) + "\n{instruction: 'x'}\n")
    with pytest.raises(ValueError, match=rf"{path} line 2 is not valid JSON: Expecting property name"):
        read_rows(str(path))


def test_invalid_json_array_names_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n{"instruction": "x",}\n]')
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON: .* at line 2"):
        read_rows(str(path))


def test_jsonl_string_with_line_separator_is_one_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    row = {"instruction": "Join\u2028these", "output": "ok"}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_rows(str(path)) == [row]


def test_data_config_rejects_eval_fraction_one():
    with pytest.raises(ValueError, match="invalid eval_fraction 1.0"):
        DataConfig(path="x", eval_fraction=1.0)


def test_alpaca_template_includes_input_section():
    prompt = format_prompt(row_to_example(ALPACA_ROWS[3], 3), "alpaca")
    assert "### Input:\nThe fox jumps over the dog." in prompt
    assert prompt.endswith("### Response:\n")


def test_code_template_shows_first_test():
    prompt = format_prompt(row_to_example(MBPP_ROWS[0], 0), "code")
    assert "assert add(1, 2) == 3" in prompt
    assert prompt.endswith("# Solution:\n")


def test_completion_template_is_prompt_without_trailing_newline():
    assert format_prompt(row_to_example(HUMANEVAL_ROW, 0), "completion") == HUMANEVAL_ROW["prompt"].rstrip()


def test_chat_template_without_tokenizer_template_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="template 'chat' needs a tokenizer with a chat template"):
        format_prompt(Example("Hi?", "Hello."), "chat", tiny_tokenizer)


def test_unknown_template_rejected():
    with pytest.raises(ValueError, match="invalid template 'markdown'"):
        format_prompt(Example("Hi?", "Hello."), "markdown")


def test_self_instruct_row_uses_first_instance():
    row = {
        "id": "user_oriented_task_0",
        "instruction": "Rewrite the sentence more concisely.",
        "instances": [{"input": "If you have any questions, please let me know.", "output": "Questions? Let me know."}],
    }
    example = row_to_example(row, 0)
    assert example.input == "If you have any questions, please let me know."
    assert example.response == "Questions? Let me know."
    assert example.task_id == "user_oriented_task_0"
