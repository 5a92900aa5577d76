"""Experiment grids on tiny real models: planning, validation, running, resuming and the report files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from cora.cli import main
from cora.compare import cut_mbpp_split, grid_from_dict, load_grid, plan_runs, run_grid
from test_training import ALPACA_ROWS, MBPP_ROWS, write_jsonl


def tiny_grid(model_dir, variant_dir, data_file) -> dict:
    return {
        "name": "tiny",
        "run": {
            "model": str(model_dir),
            "adapter": {"r": 4},
            "training": {"max_steps": 2, "batch_size": 2, "max_length": 192, "logging_steps": 1},
            "evaluation": {"max_new_tokens": 4, "batch_size": 4},
        },
        "seeds": [0, 1],
        "bases": {"two_models": {"models": ["base", str(variant_dir)], "rank": 4}},
        "methods": {
            "base_model": {"train": False},
            "lora": {"adapter": {"mode": "lora"}},
            "frozen": {"adapter": {"mode": "frozen"}, "basis": "two_models"},
        },
        "tasks": {
            "alpaca": {
                "data": {"path": str(data_file), "eval_size": 2},
                "template": "alpaca",
                "eval": {"held_out": {"metrics": ["rouge1", "sacrebleu"]}},
            }
        },
    }


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, tiny_llama_dir, tiny_llama_variant_dir):
    """Run the tiny grid once; tests that change its folder copy it first or run it again on purpose."""
    folder = tmp_path_factory.mktemp("grid")
    data = write_jsonl(folder / "alpaca.jsonl", ALPACA_ROWS)
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, data)
    raw["claims"] = {
        "frozen_matches_lora": {"method": "frozen", "baseline": "lora"},
        "lora_beats_base": {"method": "lora", "baseline": "base_model", "expect": "better"},
    }
    out = folder / "out"
    result = run_grid(grid_from_dict(raw), out)
    return raw, out, result


def test_grid_plans_base_model_once(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    grid = grid_from_dict(tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, tmp_path / "a.jsonl"))
    labels = [plan.label for plan in plan_runs(grid, tmp_path)]
    assert labels == [
        "alpaca/base_model/base",
        "alpaca/lora/seed 0",
        "alpaca/lora/seed 1",
        "alpaca/frozen/seed 0",
        "alpaca/frozen/seed 1",
    ]


def test_grid_seeds_set_training_and_init_seed(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    grid = grid_from_dict(tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, tmp_path / "a.jsonl"))
    config = plan_runs(grid, tmp_path)[2].run_config(grid)
    assert config.training.seed == 1
    assert config.adapter.init_seed == 1


def test_grid_runs_every_cell(grid_run):
    _, _, result = grid_run
    assert result.trained == 4
    assert len(result.records) == 5


def test_grid_writes_tables_and_plots(grid_run):
    _, out, _ = grid_run
    for name in ("results.md", "results.csv", "results.json", "metrics_alpaca_held_out.png", "loss_alpaca.png"):
        assert (out / name).is_file(), name


def test_grid_writes_claims(grid_run):
    _, out, _ = grid_run
    claims = {entry["claim"]: entry for entry in json.loads((out / "claims.json").read_text())}
    assert set(claims) == {"frozen_matches_lora", "lora_beats_base"}
    comparisons = {c["metric"]: c for c in claims["lora_beats_base"]["comparisons"]}
    assert set(comparisons) == {"rouge1", "sacrebleu", "response_nll"}
    assert all(c["pairs"] == 2 for c in comparisons.values())  # the base model's one run pairs with both seeds
    assert "| frozen_matches_lora | alpaca / held_out | frozen vs lora |" in (out / "claims.md").read_text()


def test_claim_with_unknown_method_rejected(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, tmp_path / "a.jsonl")
    raw["claims"] = {"typo": {"method": "frozn", "baseline": "lora"}}
    with pytest.raises(ValueError, match="claim 'typo': method 'frozn' is not in methods"):
        grid_from_dict(raw)


def test_claim_with_unknown_metric_rejected(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, tmp_path / "a.jsonl")
    raw["claims"] = {"typo": {"method": "frozen", "baseline": "lora", "metrics": ["rougeX"]}}
    with pytest.raises(ValueError, match="claim 'typo': unknown metric 'rougeX'"):
        grid_from_dict(raw)


def test_grid_table_aggregates_seeds(grid_run):
    _, out, _ = grid_run
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["lora"]["seeds"] == 2
    assert rows["base_model"]["seeds"] == 1
    assert rows["base_model"]["trainable_parameters"] == 0


def test_frozen_method_trains_half_of_lora(grid_run):
    _, out, _ = grid_run
    rows = {row["method"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["frozen"]["trainable_parameters"] * 2 == rows["lora"]["trainable_parameters"]


def test_grid_rerun_skips_finished_cells(grid_run):
    raw, out, _ = grid_run
    adapter = out / "runs" / "alpaca" / "lora" / "seed0" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    again = run_grid(grid_from_dict(raw), out)
    assert (again.trained, again.evaluated, again.skipped) == (0, 0, 5)
    assert adapter.stat().st_mtime_ns == before


def test_grid_redoes_partial_run(grid_run, tmp_path):
    raw, out, _ = grid_run
    (out / "runs" / "alpaca" / "frozen" / "seed1" / "train_summary.json").unlink()
    again = run_grid(grid_from_dict(raw), out)
    assert again.trained == 1
    assert again.evaluated == 1


def test_grid_reevaluates_missing_metrics_only(grid_run):
    raw, out, _ = grid_run
    (out / "runs" / "alpaca" / "base_model" / "base" / "eval" / "held_out" / "metrics.json").unlink()
    again = run_grid(grid_from_dict(raw), out)
    assert (again.trained, again.evaluated) == (0, 1)


def test_grid_retrains_method_whose_config_changed(grid_run):
    raw, out, _ = grid_run
    changed = copy.deepcopy(raw)
    changed["methods"]["lora"]["training"] = {"lr": 1e-3}
    again = run_grid(grid_from_dict(changed), out)
    assert again.trained == 2


def test_method_overriding_budget_rejected(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, tmp_path / "a.jsonl")
    raw["methods"]["lora"]["training"] = {"max_steps": 10}
    with pytest.raises(ValueError, match="method 'lora' overrides training.max_steps"):
        grid_from_dict(raw)


def test_unknown_basis_reference_rejected(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, tmp_path / "a.jsonl")
    raw["methods"]["frozen"]["basis"] = "missing"
    with pytest.raises(ValueError, match="uses basis 'missing', which is not in bases"):
        grid_from_dict(raw)


def test_unknown_source_reference_rejected(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, tmp_path / "a.jsonl")
    raw["bases"]["two_models"]["models"] = ["base", "source:nowhere"]
    with pytest.raises(ValueError, match="sources has no 'nowhere'"):
        grid_from_dict(raw)


def test_invalid_run_field_rejected_at_load(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, tmp_path / "a.jsonl")
    raw["methods"]["lora"]["adapter"]["mode"] = "sideways"
    with pytest.raises(ValueError, match="run alpaca/lora/seed 0: .*invalid mode 'sideways'"):
        grid_from_dict(raw)


def test_eval_set_without_path_rejected(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, tmp_path / "a.jsonl")
    raw["tasks"]["alpaca"]["eval"]["other"] = {"source": "file"}
    with pytest.raises(ValueError, match="eval set 'other': source 'file' needs a path"):
        grid_from_dict(raw)


def test_mbpp_split_keeps_split_ids(tmp_path):
    rows = [dict(row, task_id=task_id) for row, task_id in zip(MBPP_ROWS, (5, 11, 510, 601, 974))]
    path = cut_mbpp_split(write_jsonl(tmp_path / "mbpp.jsonl", rows), "test", tmp_path)
    kept = [json.loads(line)["task_id"] for line in open(path)]
    assert kept == [11, 510]


def test_code_task_reports_pass_at_1(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    data = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, data)
    raw["seeds"] = [0]
    raw["methods"] = {"base_model": {"train": False}}
    raw["tasks"] = {
        "code": {
            "data": {"path": data, "eval_size": 2},
            "template": "code",
            "eval": {"mbpp": {"source": "mbpp", "path": data, "split": "prompt", "metrics": [], "execute": True}},
        }
    }
    result = run_grid(grid_from_dict(raw), tmp_path / "out")
    assert result.records[0]["metrics"]["pass@1"] == 0.0  # a random tiny model writes no passing code
    assert result.records[0]["num_examples"] == 5


def test_cli_dry_run_lists_cells(tiny_llama_dir, tiny_llama_variant_dir, tmp_path, capsys):
    config = tmp_path / "grid.yaml"
    data = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    config.write_text(yaml.safe_dump(tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, data)))
    assert main(["compare", "--config", str(config), "-o", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "5 cells, 1 bases, 0 source models" in capsys.readouterr().out


def missing_data_grid(tmp_path, model_dir, variant_dir) -> Path:
    """A grid file whose task data and eval file resolve against an empty data_root."""
    (tmp_path / "data").mkdir()
    raw = tiny_grid(model_dir, variant_dir, "alpaca/alpaca.jsonl")
    raw["data_root"] = "data"
    raw["tasks"]["alpaca"]["eval"]["extra"] = {"source": "file", "path": "extra.jsonl"}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "grid.yaml"


def test_cli_dry_run_lists_missing_data_files(tiny_llama_dir, tiny_llama_variant_dir, tmp_path, capsys):
    config = missing_data_grid(tmp_path, tiny_llama_dir, tiny_llama_variant_dir)
    assert main(["compare", "--config", str(config), "-o", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"task 'alpaca' data: alpaca/alpaca.jsonl (looked for {tmp_path / 'data' / 'alpaca' / 'alpaca.jsonl'})" in err
    assert "task 'alpaca' eval set 'extra': extra.jsonl" in err
    assert "--data-root" in err


def test_cli_dry_run_accepts_data_root_option(tiny_llama_dir, tiny_llama_variant_dir, tmp_path, capsys):
    config = missing_data_grid(tmp_path, tiny_llama_dir, tiny_llama_variant_dir)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "alpaca").mkdir(parents=True)
    write_jsonl(elsewhere / "alpaca" / "alpaca.jsonl", ALPACA_ROWS)
    write_jsonl(elsewhere / "extra.jsonl", ALPACA_ROWS)
    assert main(["compare", "--config", str(config), "-o", str(tmp_path / "out"), "--dry-run",
                 "--data-root", str(elsewhere)]) == 0


def test_run_grid_rejects_missing_data_before_work(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    grid = load_grid(missing_data_grid(tmp_path, tiny_llama_dir, tiny_llama_variant_dir))
    with pytest.raises(FileNotFoundError, match="2 data file"):
        run_grid(grid, tmp_path / "out")
    assert not (tmp_path / "out" / "bases").exists()


def test_hub_dataset_id_not_checked_as_file(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    grid = grid_from_dict(tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, "yahma/alpaca-cleaned"))
    assert grid.resolve_data_path("yahma/alpaca-cleaned") == "yahma/alpaca-cleaned"
    grid.check_data_files()


def test_cli_reports_invalid_grid(tmp_path, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text("tasks: {}\nmethods: {lora: {}}\nsurprise: 1\n")
    assert main(["compare", "--config", str(config), "-o", str(tmp_path / "out")]) == 2
    assert "unknown grid section 'surprise'" in capsys.readouterr().err


def test_load_grid_resolves_data_root(tmp_path, tiny_llama_dir, tiny_llama_variant_dir):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "alpaca.jsonl", ALPACA_ROWS)
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, "alpaca.jsonl")
    raw["data_root"] = "data"
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    grid = load_grid(tmp_path / "grid.yaml")
    assert grid.resolve_data_path("alpaca.jsonl") == str(tmp_path / "data" / "alpaca.jsonl")


# --- methods that grids compare: PiSSA (PEFT init) ---------------------------------------------------


def _logits(model, tokenizer):
    import torch

    batch = tokenizer(["def add(a, b):"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_pissa_saved_adapter_reloads_on_plain_base(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cora.adapters import AdapterConfig, build_cora_model, load_cora_adapter, save_cora_adapter

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    reference = _logits(base, tokenizer)
    model = build_cora_model(base, None, AdapterConfig(mode="lora", r=4, init_lora_weights="pissa"))
    assert torch.allclose(_logits(model, tokenizer), reference, atol=1e-4)  # PiSSA keeps the output at init

    with torch.no_grad():  # in place of training: move both factors away from their init
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    trained = _logits(model, tokenizer)
    save_cora_adapter(model, tmp_path / "adapter")

    reloaded = load_cora_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter")
    assert torch.allclose(_logits(reloaded, tokenizer), trained, atol=1e-4)


def test_pissa_rejected_for_frozen_mode():
    from cora.adapters import AdapterConfig

    with pytest.raises(ValueError, match="init_lora_weights 'pissa' applies to mode 'lora' only"):
        AdapterConfig(mode="frozen", init_lora_weights="pissa")


def test_invalid_peft_init_rejected():
    from cora.adapters import AdapterConfig

    with pytest.raises(ValueError, match="invalid init_lora_weights 'olora'"):
        AdapterConfig(mode="lora", init_lora_weights="olora")


# --- LoRA-FA (PEFT optimizer) ------------------------------------------------------------------------


def test_lorafa_run_trains_only_lora_B(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from cora.runs import RunConfig
    from cora.training import train_run

    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    config = RunConfig.from_dict(
        {
            "model": str(tiny_llama_dir),
            "data": {"path": data, "eval_size": 2},
            "adapter": {"mode": "lora", "r": 4, "init_seed": 0},
            "training": {"max_steps": 2, "batch_size": 2, "max_length": 192, "optimizer": "lorafa", "lr": 1e-2},
        }
    )
    result = train_run(config, tmp_path / "run")
    assert result.trainable_parameters == 2 * 3 * 4 * 64  # lora_B only: layers x q/k/v x (out, r)

    from transformers import set_seed

    from cora.training import prepare_model

    set_seed(config.training.seed)  # the same seeding and model set-up as train_run
    initial, _ = prepare_model(config)
    initial_A = {n: p for n, p in initial.state_dict().items() if "lora_A" in n}
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    name = next(n for n in saved if "lora_A" in n)
    live = next(n for n in initial_A if n.replace(".default", "") == name)
    assert (saved[name] == initial_A[live]).all()  # lora_A stayed at its init
    assert saved[name.replace("lora_A", "lora_B")].abs().sum() > 0  # lora_B moved away from zero


def test_lorafa_rejected_for_frozen_mode(tiny_llama_dir):
    from cora.runs import RunConfig

    with pytest.raises(ValueError, match="training.optimizer 'lorafa' .* needs adapter.mode 'lora'"):
        RunConfig.from_dict(
            {
                "data": {"path": "a.jsonl"},
                "adapter": {"mode": "frozen", "b_init": "orthogonal"},
                "training": {"optimizer": "lorafa"},
            }
        )


@pytest.mark.parametrize("name", ["quick", "instruction", "code", "sources"])
def test_committed_grid_is_valid(name):
    from pathlib import Path

    grid = load_grid(Path(__file__).parents[1] / "configs" / "grids" / f"{name}.yaml")
    assert grid.name == name


def test_failing_cell_does_not_stop_grid(tiny_llama_dir, tiny_llama_variant_dir, tmp_path):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    raw = tiny_grid(tiny_llama_dir, tiny_llama_variant_dir, data)
    raw["seeds"] = [0]
    raw["methods"] = {
        "too_wide": {"adapter": {"mode": "frozen", "r": 8}, "basis": "two_models"},  # the basis has rank 4
        "lora": {"adapter": {"mode": "lora"}},
    }
    result = run_grid(grid_from_dict(raw), tmp_path / "out")
    assert len(result.failed) == 1
    assert result.failed[0].startswith("alpaca/too_wide/seed 0: rank 8 exceeds the basis rank 4")
    assert [record["method"] for record in result.records] == ["lora"]
