"""WordNet setup: Debian's database laid out as nltk data, with the lexnames table."""

from __future__ import annotations

from pathlib import Path

import pytest

from cora.wordnet import (
    DATABASE_FILES,
    WordNetUnavailableError,
    find_wordnet_source,
    lexnames_text,
    setup_wordnet,
)

SYSTEM_WORDNET = find_wordnet_source()
needs_system_wordnet = pytest.mark.skipif(
    SYSTEM_WORDNET is None, reason="WordNet database not installed (apt-get install wordnet-base wordnet-sense-index)"
)


def test_lexnames_lists_45_files_in_order():
    rows = [line.split("\t") for line in lexnames_text().splitlines()]
    assert [int(row[0]) for row in rows] == list(range(45))
    assert rows[3][1:] == ["noun.Tops", "1"]
    assert rows[29][1:] == ["verb.body", "2"]
    assert rows[44][1:] == ["adj.ppl", "3"]


def test_lexnames_category_matches_file_prefix():
    categories = {"noun": "1", "verb": "2", "adj": "3", "adv": "4"}
    for line in lexnames_text().splitlines():
        _, name, category = line.split("\t")
        assert categories[name.split(".")[0]] == category, line


def test_setup_rejects_folder_without_database(tmp_path):
    (tmp_path / "index.noun").write_text("")
    with pytest.raises(WordNetUnavailableError, match="apt-get install wordnet-base"):
        setup_wordnet(tmp_path, tmp_path / "nltk_data")


def test_setup_leaves_no_folder_after_error(tmp_path):
    with pytest.raises(WordNetUnavailableError):
        setup_wordnet(tmp_path, tmp_path / "nltk_data")
    assert not (tmp_path / "nltk_data" / "corpora" / "wordnet").exists()


@needs_system_wordnet
def test_setup_builds_readable_nltk_corpus(tmp_path, monkeypatch):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # nltk opens corpora only under its data path
    target = setup_wordnet(SYSTEM_WORDNET, tmp_path)
    reader = WordNetCorpusReader(str(target), None)
    assert reader.synset("dog.n.01").lexname() == "noun.animal"
    assert reader.synset("run.v.01").lexname() == "verb.motion"
    assert "automobile" in reader.synset("car.n.01").lemma_names()


@needs_system_wordnet
def test_setup_copies_every_database_file(tmp_path):
    target = setup_wordnet(SYSTEM_WORDNET, tmp_path)
    for name in DATABASE_FILES + ("lexnames",):
        path = target / name
        assert path.is_file() and not path.is_symlink(), name


@needs_system_wordnet
def test_setup_replaces_existing_folder(tmp_path):
    first = setup_wordnet(SYSTEM_WORDNET, tmp_path)
    (first / "stale").write_text("left from an old layout")
    second = setup_wordnet(SYSTEM_WORDNET, tmp_path)
    assert second == first
    assert not (second / "stale").exists()
    assert not [path for path in Path(tmp_path, "corpora").iterdir() if path.name.startswith(".wordnet-")]
