"""Metrics computed by the real libraries, offline."""

from __future__ import annotations

import pytest

from cora.metrics import METRICS, MetricsConfig, MetricUnavailableError, compute_metrics
from cora.wordnet import find_wordnet_source, setup_wordnet

PREDICTIONS = ["The cat sat on the mat.", "def add(a, b):\n    return a + b"]
REFERENCES = ["A cat was sitting on the rug.", "def add(x, y):\n    return x + y"]


@pytest.fixture(scope="module", autouse=True)
def wordnet_data(tmp_path_factory):
    """Lay out WordNet in a private nltk data folder for METEOR, when the database is installed."""
    import nltk

    source = find_wordnet_source()
    if source is None:
        return None
    folder = tmp_path_factory.mktemp("nltk_data")
    setup_wordnet(source, folder)
    nltk.data.path.insert(0, str(folder))
    yield folder
    nltk.data.path.remove(str(folder))


def test_metrics_config_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown metric.*bleu4"):
        MetricsConfig(metrics=("rouge1", "bleu4"))


def test_compute_metrics_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        compute_metrics(PREDICTIONS, REFERENCES[:1], MetricsConfig(metrics=("rouge1",)))


def test_identical_texts_score_maximum_rouge_and_bleu():
    scores = compute_metrics(REFERENCES, REFERENCES, MetricsConfig(metrics=("rouge1", "rouge2", "rougeL", "sacrebleu")))
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rouge2"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(1.0)
    assert scores["sacrebleu"] == pytest.approx(100.0)


def test_rouge_matches_rouge_score_library():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rouge1"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)) / 2
    assert compute_metrics(PREDICTIONS, REFERENCES, MetricsConfig(metrics=("rouge1",)))["rouge1"] == pytest.approx(expected)


def test_rouge_uses_stemming():
    scores = compute_metrics(["the cats jumped"], ["the cat jumps"], MetricsConfig(metrics=("rouge1",)))
    assert scores["rouge1"] == pytest.approx(1.0)


def test_sacrebleu_is_corpus_level():
    import sacrebleu

    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert compute_metrics(PREDICTIONS, REFERENCES, MetricsConfig(metrics=("sacrebleu",)))["sacrebleu"] == pytest.approx(expected)


def test_output_follows_requested_order():
    scores = compute_metrics(PREDICTIONS, REFERENCES, MetricsConfig(metrics=("sacrebleu", "rougeL")))
    assert list(scores) == ["sacrebleu", "rougeL"]


def test_meteor_credits_wordnet_synonyms(wordnet_data):
    if wordnet_data is None:
        pytest.skip("WordNet database not installed")
    config = MetricsConfig(metrics=("meteor",))
    # "auto" is its own Porter stem: nltk matches synonyms against stemmed leftovers.
    synonym = compute_metrics(["he bought a new car"], ["he bought a new auto"], config)["meteor"]
    unrelated = compute_metrics(["he bought a new sandwich"], ["he bought a new auto"], config)["meteor"]
    assert synonym > unrelated + 0.2


def test_meteor_scores_empty_prediction_zero(wordnet_data):
    if wordnet_data is None:
        pytest.skip("WordNet database not installed")
    assert compute_metrics([""], ["a reference"], MetricsConfig(metrics=("meteor",)))["meteor"] == 0.0


def test_meteor_without_wordnet_names_install_step(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setenv("CORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MetricUnavailableError, match="apt-get install wordnet-base"):
        compute_metrics(["a"], ["a"], MetricsConfig(metrics=("meteor",)))


def test_bertscore_ranks_paraphrase_above_unrelated():
    config = MetricsConfig(metrics=("bertscore_f1",))
    paraphrase = compute_metrics(["A cat was sitting on the rug."], ["The cat sat on the mat."], config)
    unrelated = compute_metrics(["Interest rates rose sharply in May."], ["The cat sat on the mat."], config)
    assert paraphrase["bertscore_f1"] > unrelated["bertscore_f1"]


def test_bertscore_scores_empty_prediction_zero():
    scores = compute_metrics(["", "same text"], ["a reference", "same text"], MetricsConfig(metrics=("bertscore_f1",)))
    assert scores["bertscore_f1"] == pytest.approx(0.5, abs=1e-4)


def test_bertscore_missing_model_folder_is_an_error(tmp_path):
    config = MetricsConfig(metrics=("bertscore_f1",), bertscore_model=str(tmp_path / "absent"), bertscore_num_layers=6)
    with pytest.raises(MetricUnavailableError, match="absent not found"):
        compute_metrics(["a"], ["a"], config)


def test_bertscore_custom_model_needs_layer_count(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="bertscore_num_layers is required"):
        compute_metrics(["a"], ["a"], MetricsConfig(metrics=("bertscore_f1",), bertscore_model=str(tmp_path)))


def test_all_metrics_reported_by_default():
    assert tuple(compute_metrics(PREDICTIONS, REFERENCES)) == METRICS
