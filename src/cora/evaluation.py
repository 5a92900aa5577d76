"""Evaluation: generate on held-out examples, score against references, write the results.

    examples --format_prompt--> prompts --generate_completions--> predictions
        --compute_metrics--> ROUGE / METEOR / SacreBLEU / BERTScore
        --check_completions (code tasks, optional)--> pass@k
    examples --response_loss (optional)--> held-out NLL of the references

Which examples are scored (:func:`select_examples`):

* no data file given: the held-out split of the run's training data, rebuilt with
  ``split_examples(load_examples(...), run_config.data)``, so it is exactly the
  part ``cora train`` did not see;
* a data file that is the run's training file (same resolved path, or same Hub id):
  its held-out split, as above;
* any other data file: all of its rows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cora.code_tasks import check_completions, mean_pass_at_k
from cora.data import DataConfig, Example, format_prompt, load_examples, split_examples
from cora.execution import ExecutionConfig
from cora.generation import STOP_SEQUENCES, GenerationConfig, generate_completions
from cora.likelihood import RESPONSE_LOSS_NAME, response_loss
from cora.metrics import MetricsConfig, compute_metrics

logger = logging.getLogger(__name__)

PREDICTIONS_NAME = "predictions.jsonl"
METRICS_NAME = "metrics.json"


@dataclass(frozen=True)
class EvaluationConfig:
    """Generation, metric and execution settings of :func:`evaluate_model`."""

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    stop_sequences: tuple[str, ...] | None = None  # None: the template's defaults (generation.STOP_SEQUENCES)
    metrics: MetricsConfig | None = field(default_factory=MetricsConfig)  # None: no text metrics
    execute: bool = False  # run code tests in the sandbox and report pass@k
    pass_k: tuple[int, ...] = (1,)  # k values of pass@k; each needs k <= generation.num_return_sequences
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    workers: int = 2  # sandboxed programs run at the same time
    response_loss: bool = True  # also report the NLL per token of the references (cora.likelihood)
    loss_max_length: int = 1024  # tokens per example for the response loss, prompt included

    def __post_init__(self) -> None:
        if self.metrics is None and not self.execute and not self.response_loss:
            raise ValueError(
                "nothing to compute: metrics is None and execute and response_loss are False; select one of them"
            )
        samples = self.generation.num_return_sequences
        for k in self.pass_k:
            if not 1 <= k <= samples:
                raise ValueError(f"invalid pass@k k={k}; expected 1 <= k <= {samples} completions per example")
        if self.workers < 1:
            raise ValueError(f"invalid workers {self.workers}; expected a positive integer")
        if self.loss_max_length < 2:
            raise ValueError(f"invalid loss_max_length {self.loss_max_length}; expected at least 2 tokens")


@dataclass(frozen=True)
class PredictionRecord:
    """One scored example, as written to ``predictions.jsonl``."""

    task_id: str
    prompt: str
    prediction: str  # the first completion: the greedy one, or the first sample when sampling
    reference: str
    samples: list[str] | None = None  # every completion, when more than one was drawn
    passed: list[bool] | None = None  # test outcome per completion, when executed
    status: list[str] | None = None  # sandbox status per completion, when executed


@dataclass
class EvaluationResult:
    """Predictions, scores and the settings that produced them."""

    records: list[PredictionRecord]
    metrics: dict[str, float]
    seconds: float  # wall-clock time of generation, scoring and execution
    settings: dict[str, Any]

    @property
    def num_examples(self) -> int:
        return len(self.records)

    def summary(self, context: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the content of ``metrics.json``: scores, example count, settings, seconds and ``context``."""
        return {
            "metrics": self.metrics,
            "num_examples": self.num_examples,
            "seconds": round(self.seconds, 3),
            "settings": self.settings,
            **(context or {}),
        }

    def write(self, out_dir: str | Path, context: dict[str, Any] | None = None) -> tuple[Path, Path]:
        """Write ``predictions.jsonl`` and ``metrics.json`` into ``out_dir``, each atomically.

        Args:
            context: extra top-level fields for ``metrics.json`` (model, run folder, data).
        """
        from cora.files import write_atomic

        out = Path(out_dir)
        lines = []
        for record in self.records:
            row = {key: value for key, value in dataclasses.asdict(record).items() if value is not None}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        predictions_path, metrics_path = out / PREDICTIONS_NAME, out / METRICS_NAME
        write_atomic(predictions_path, "".join(lines))
        write_atomic(metrics_path, json.dumps(self.summary(context), indent=2) + "\n")
        return predictions_path, metrics_path


def evaluate_model(
    model: Any, tokenizer: Any, examples: list[Example], template: str, config: EvaluationConfig | None = None
) -> EvaluationResult:
    """Generate a completion per example and score it.

    Args:
        model: causal LM (plain or PEFT), already on its device.
        template: prompt template for :func:`cora.data.format_prompt`.

    Returns:
        Records in example order and metrics: the text metrics of ``config.metrics``
        on the first completion, plus ``pass@k`` when ``config.execute`` and the
        references' NLL per token (``response_nll``) when ``config.response_loss``.
    """
    config = config or EvaluationConfig()
    if not examples:
        raise ValueError("no examples to evaluate; check the data file and --max-examples")
    if config.execute:
        untested = [example.task_id for example in examples if not example.tests]
        if untested:
            raise ValueError(
                f"{len(untested)} examples have no tests (first: {untested[0]!r}); "
                "executing code needs MBPP or HumanEval data, or drop --execute"
            )

    started = time.monotonic()
    stop_sequences = STOP_SEQUENCES.get(template, ()) if config.stop_sequences is None else config.stop_sequences
    generation = dataclasses.replace(config.generation, stop_sequences=tuple(stop_sequences))
    prompts = [format_prompt(example, template, tokenizer) for example in examples]
    completions = generate_completions(model, tokenizer, prompts, generation)
    predictions = [texts[0] for texts in completions]
    references = [example.response for example in examples]

    metrics: dict[str, float] = {}
    if config.metrics is not None:
        metrics.update(compute_metrics(predictions, references, config.metrics))
    executions = None
    if config.execute:
        executions = check_completions(examples, completions, template, config.execution, workers=config.workers)
        for k in config.pass_k:
            metrics[f"pass@{k}"] = mean_pass_at_k(executions, k)
    if config.response_loss:
        metrics[RESPONSE_LOSS_NAME] = response_loss(
            model, tokenizer, examples, template, config.loss_max_length, config.generation.batch_size
        )

    records = _records(examples, prompts, completions, executions)
    settings = {
        "template": template,
        "generation": dataclasses.asdict(generation),
        "metrics": dataclasses.asdict(config.metrics) if config.metrics is not None else None,
        "execute": config.execute,
        "execution": dataclasses.asdict(config.execution) if config.execute else None,
        "response_loss": config.response_loss,
        "loss_max_length": config.loss_max_length,
    }
    seconds = time.monotonic() - started
    logger.info("evaluated %d examples in %.1f s: %s", len(examples), seconds, metrics)
    return EvaluationResult(records, metrics, seconds, settings)


def _records(examples, prompts, completions, executions) -> list[PredictionRecord]:
    records = []
    for index, (example, prompt, texts) in enumerate(zip(examples, prompts, completions)):
        results = executions[index] if executions is not None else None
        records.append(
            PredictionRecord(
                task_id=example.task_id,
                prompt=prompt,
                prediction=texts[0],
                reference=example.response,
                samples=texts if len(texts) > 1 else None,
                passed=[result.passed for result in results] if results is not None else None,
                status=[result.status for result in results] if results is not None else None,
            )
        )
    return records


def _same_source(path: str, training_path: str) -> bool:
    if path == training_path:
        return True
    first, second = Path(path), Path(training_path)
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def select_examples(
    data_path: str | None, run_data: DataConfig | None, split: str = "train", max_examples: int | None = None
) -> tuple[list[Example], str]:
    """Choose the evaluation examples (rule in the module docstring).

    Args:
        data_path: data file or Hub id given for evaluation; None: the run's training data.
        run_data: the run's data config; None when evaluating a base model on its own.
        split: Hub dataset split of ``data_path`` (the run's own split is used for its training data).
        max_examples: keep the first N selected examples.

    Returns:
        ``(examples, description)``, where the description names the rule that applied.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"invalid max_examples {max_examples}; expected a positive integer")
    if data_path is None and run_data is None:
        raise ValueError("no evaluation data: pass a data file (--data) or a run folder")

    if run_data is not None and (data_path is None or _same_source(data_path, run_data.path)):
        _, examples = split_examples(load_examples(run_data.path, run_data.split), run_data)
        description = f"held-out split of {run_data.path}"
    else:
        examples = load_examples(data_path, split)
        description = f"all rows of {data_path}"
    if max_examples is not None:
        examples = examples[:max_examples]
    logger.info("evaluating %d examples: %s", len(examples), description)
    return examples, description


def data_name(path: str) -> str:
    """Return a folder name for a data file or Hub id: ``alpaca_5000.json`` -> ``alpaca_5000``."""
    local = Path(path)
    is_file = local.exists() or local.name.endswith((".json", ".jsonl", ".gz"))
    if is_file and not path.startswith("hub:"):
        name = local.name
    else:
        name = path.removeprefix("hub:").replace("/", "__")
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name or "data"
