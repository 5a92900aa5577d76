"""Writing user-visible outputs atomically: a temporary sibling, then a rename.

``tempfile.mkstemp`` and ``tempfile.mkdtemp`` create private entries (mode 0600
and 0700). An output renamed into place keeps that mode, so other users and
services could not read a saved adapter or basis. :func:`publish_permissions`
gives the temporary entry the mode a plain ``open`` or ``mkdir`` would have
given it under the current umask, before the rename.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_permissions(path: str | os.PathLike) -> None:
    """Give a temporary file or folder the default permissions of a new one."""
    path = Path(path)
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it to ``path``.

    If the block raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp_name)
        publish_permissions(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block succeeds, it replaces ``path``.

    If the block raises, the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield temp_dir
        # NOTE: an existing folder is removed before the rename, because os.replace cannot
        # replace a non-empty folder; a crash between the two steps leaves neither.
        if path.exists():
            shutil.rmtree(path)
        publish_permissions(temp_dir)
        os.replace(temp_dir, path)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it."""
    with atomic_file(path) as temp_path:
        temp_path.write_text(text, encoding="utf-8")
