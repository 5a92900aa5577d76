"""WordNet for METEOR: lay out a WordNet 3.0 database as nltk data, offline.

nltk's WordNet reader expects ``<nltk_data>/corpora/wordnet`` with the WordNet
database files (``index.*``, ``data.*``, ``*.exc``) and a ``lexnames`` table.
Debian's ``wordnet-base`` and ``wordnet-sense-index`` packages install the
database under ``/usr/share/wordnet`` but no ``lexnames`` file, so :func:`setup_wordnet` links
copies the database files into an nltk data folder and writes ``lexnames`` from the
table this package ships (the 45 lexicographer files of lexnames(5WN)).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from cora.files import publish_permissions

logger = logging.getLogger(__name__)

DEFAULT_SOURCE_DIRS = ("/usr/share/wordnet", "/usr/local/WordNet-3.0/dict", "/usr/share/wordnet/dict")
# nltk 3.10 reads index.sense (sense keys) when it loads WordNet; Debian ships it in wordnet-sense-index.
DATABASE_FILES = (
    tuple(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv"))
    + tuple(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv"))
    + ("index.sense",)
)
OPTIONAL_FILES = ("cntlist.rev",)  # sense counts, read only by Lemma.count()

INSTALL_HINT = (
    "install WordNet with `apt-get install wordnet-base wordnet-sense-index` and then run `cora setup-wordnet`, "
    "or run `python -m nltk.downloader wordnet` where internet access is available"
)


class WordNetUnavailableError(RuntimeError):
    """WordNet data is missing, so METEOR cannot match synonyms."""


def default_nltk_data_dir() -> Path:
    """Return the nltk data folder cora manages: ``$CORA_CACHE/nltk_data`` or ``~/.cache/cora/nltk_data``."""
    cache = os.environ.get("CORA_CACHE")
    root = Path(cache) if cache else Path.home() / ".cache" / "cora"
    return root / "nltk_data"


def lexnames_text() -> str:
    """Return the ``lexnames`` table: one tab-separated line (number, file name, category) per file."""
    return resources.files("cora.resources").joinpath("wordnet_lexnames.tsv").read_text(encoding="utf-8")


def find_wordnet_source(candidates: tuple[str, ...] = DEFAULT_SOURCE_DIRS) -> Path | None:
    """Return the first folder that contains every WordNet database file, or None."""
    for candidate in candidates:
        folder = Path(candidate)
        if all((folder / name).is_file() for name in DATABASE_FILES):
            return folder
    return None


def setup_wordnet(source_dir: str | Path | None = None, nltk_data_dir: str | Path | None = None) -> Path:
    """Build ``<nltk_data_dir>/corpora/wordnet`` from a WordNet 3.0 database folder.

    The files are copied (about 28 MB): nltk 3.10 rejects symlinks that resolve
    outside the corpus folder and files with more than one hard link.

    Args:
        source_dir: folder with the database files; default: the first of
            ``DEFAULT_SOURCE_DIRS`` that has them (Debian's ``/usr/share/wordnet``).
        nltk_data_dir: nltk data root; default :func:`default_nltk_data_dir`.

    Returns:
        The ``corpora/wordnet`` folder, complete with ``lexnames``.

    Raises:
        WordNetUnavailableError: no source folder, or one that lacks database files.
    """
    source = Path(source_dir) if source_dir is not None else find_wordnet_source()
    if source is None:
        raise WordNetUnavailableError(f"no WordNet database found in {', '.join(DEFAULT_SOURCE_DIRS)}; {INSTALL_HINT}")
    missing = [name for name in DATABASE_FILES if not (source / name).is_file()]
    if missing:
        raise WordNetUnavailableError(
            f"WordNet folder {source} lacks {', '.join(missing)}; pass a folder with the WordNet 3.0 "
            f"database files, or {INSTALL_HINT}"
        )

    target = Path(nltk_data_dir or default_nltk_data_dir()) / "corpora" / "wordnet"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename, so a reader never sees a half-built folder.
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    try:
        for name in DATABASE_FILES + OPTIONAL_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        (staging / "lexnames").write_text(lexnames_text(), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        publish_permissions(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("WordNet from %s laid out in %s", source, target)
    return target


def add_nltk_data_dir(nltk_data_dir: str | Path | None = None) -> Path:
    """Put an nltk data folder (default :func:`default_nltk_data_dir`) first on ``nltk.data.path``."""
    import nltk

    folder = str(Path(nltk_data_dir or default_nltk_data_dir()))
    if folder not in nltk.data.path:
        nltk.data.path.insert(0, folder)
    return Path(folder)


def ensure_wordnet(nltk_data_dir: str | Path | None = None):
    """Load nltk's WordNet reader, searching cora's nltk data folder first.

    Returns:
        The loaded ``nltk.corpus.wordnet`` reader.

    Raises:
        WordNetUnavailableError: nltk finds no usable WordNet; the message says how to install it.
    """
    import nltk

    add_nltk_data_dir(nltk_data_dir)
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError as error:
        raise WordNetUnavailableError(f"WordNet data not found by nltk (METEOR needs it); {INSTALL_HINT}") from error

    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except (LookupError, OSError, ValueError) as error:
        raise WordNetUnavailableError(f"WordNet data found but not readable by nltk: {error}; {INSTALL_HINT}") from error
    return wordnet
