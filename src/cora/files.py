"""Writing user-visible outputs atomically: a temporary sibling, then a rename.

``tempfile.mkstemp`` and ``tempfile.mkdtemp`` create private entries (mode 0600
and 0700). An output renamed into place keeps that mode, so other users and
services could not read a saved adapter or basis. :func:`publish_permissions`
gives the temporary entry the mode a plain ``open`` or ``mkdir`` would have
given it under the current umask, before the rename.
"""

from __future__ import annotations

import os
import tempfile
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


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        publish_permissions(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
