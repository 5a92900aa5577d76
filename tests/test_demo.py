"""The demo pipeline end to end on a tiny model: basis, two adapters, table."""

import json

from cora.cli import main
from cora.demo import TABLE_METRICS, DemoConfig, run_demo

CODE_ROWS = [
    {"task_id": f"t{i}", "text": f"Write a function that returns {i} times x.", "code": f"def times_{i}(x):\n    return {i} * x\n",
     "test_list": [f"assert times_{i}(2) == {2 * i}"]}
    for i in range(12)
]


def write_code_data(path):
    path.write_text("".join(json.dumps(row) + "\n" for row in CODE_ROWS))
    return str(path)


def test_demo_rows_cover_base_and_both_adapters(tmp_path, tiny_llama_dir):
    config = DemoConfig(
        output_dir=tmp_path / "demo", model=str(tiny_llama_dir), data=write_code_data(tmp_path / "code.jsonl"),
        template="code", rank=4, group="qkv", steps=2, batch_size=2, max_length=96, eval_size=3, max_new_tokens=8,
    )
    rows = run_demo(config)
    assert [row.method for row in rows] == ["base model", "lora", "frozen"]
    # frozen trains only lora_A: r * in per module, 3 modules per layer, 2 layers.
    assert rows[2].trainable_parameters == 4 * 64 * 3 * 2
    assert rows[1].trainable_parameters == 4 * (64 + 64) * 3 * 2
    assert all(set(TABLE_METRICS) <= row.metrics.keys() for row in rows)


def test_demo_command_prints_table(tmp_path, tiny_llama_dir, capsys):
    data = write_code_data(tmp_path / "code.jsonl")
    code = main([
        "demo", "-o", str(tmp_path / "demo"), "--model", str(tiny_llama_dir), "--data", data, "--template", "code",
        "--rank", "2", "--group", "module", "--steps", "1", "--batch-size", "2", "--max-length", "96",
        "--eval-size", "2", "--max-new-tokens", "4",
    ])
    output = capsys.readouterr().out
    assert code == 0
    assert "| method | trainable params | train s | ROUGE-L | METEOR | SacreBLEU | BERTScore F1 |" in output
    assert "| frozen | 768 |" in output  # 2 * 64 per module, 6 modules
    assert (tmp_path / "demo" / "results.json").is_file()


def test_demo_rejects_unknown_mode(tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"invalid demo modes \['half'\]"):
        DemoConfig(output_dir=tmp_path, modes=("lora", "half"))
