"""Atomic outputs: renamed into place with the permissions of a new file or folder."""

import os
import stat

from cora.files import current_umask, publish_permissions, write_atomic


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_atomic_file_has_default_mode(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    write_atomic(path, "{}\n")
    assert path.read_text() == "{}\n"
    assert mode_of(path) == 0o666 & ~current_umask()


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    write_atomic(tmp_path / "a.txt", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_publish_permissions_opens_private_folder(tmp_path):
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    publish_permissions(folder)
    assert mode_of(folder) == 0o777 & ~current_umask()


def test_basis_file_is_readable_by_others(tmp_path):
    from test_basis import make_basis

    path = make_basis().save(tmp_path / "basis.safetensors")
    assert mode_of(path) & 0o044 == 0o044 & ~current_umask()


def test_atomic_directory_failure_keeps_old_folder(tmp_path):
    import pytest

    from cora.files import atomic_directory

    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_directory(target) as temp_dir:
            (temp_dir / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_atomic_directory_replaces_folder(tmp_path):
    from cora.files import atomic_directory

    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as temp_dir:
        (temp_dir / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert mode_of(target) == 0o777 & ~current_umask()
