"""``cora setup-wordnet``: lay out WordNet as nltk data so METEOR works offline."""

from __future__ import annotations

import argparse

from cora.wordnet import DEFAULT_SOURCE_DIRS, default_nltk_data_dir, ensure_wordnet, setup_wordnet


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "setup-wordnet",
        help="lay out a WordNet 3.0 database (Debian's wordnet-base and wordnet-sense-index) as nltk data for METEOR",
        description=(
            "Copy the WordNet database files into <nltk-data>/corpora/wordnet and write the lexnames table "
            "that nltk's reader needs. Install the database first with `apt-get install wordnet-base wordnet-sense-index`."
        ),
    )
    parser.add_argument(
        "--source",
        default=None,
        help=f"folder with the WordNet database files (default: first found of {', '.join(DEFAULT_SOURCE_DIRS)})",
    )
    parser.add_argument(
        "--nltk-data",
        default=None,
        help=f"nltk data folder to write (default: {default_nltk_data_dir()}, from $CORA_CACHE when set)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target = setup_wordnet(args.source, args.nltk_data)
    wordnet = ensure_wordnet(target.parent.parent)
    synonyms = sorted({lemma.name() for synset in wordnet.synsets("car") for lemma in synset.lemmas()})[:5]
    print(f"WordNet ready in {target} ({len(list(wordnet.all_synsets('n')))} noun synsets; 'car': {', '.join(synonyms)})")
    return 0
