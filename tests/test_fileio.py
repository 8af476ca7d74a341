"""Atomic files and folders: whole or absent, nothing left behind, the permissions a plain open / mkdir gives."""

import os
import stat

import pytest

from d3s2.fileio import atomic_dir, atomic_path, atomic_write, atomic_write_bytes, atomic_write_text


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_files_and_folders_follow_the_umask(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.json", "{}\n")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"xy")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "c.txt").write_text("c")
    # mkstemp / mkdtemp would give 0o600 / 0o700
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.bin") == 0o644
    assert _mode(tmp_path / "folder") == 0o755
    os.umask(0o077)
    atomic_write_bytes(tmp_path / "d.bin", b"d")
    assert _mode(tmp_path / "d.bin") == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_writer_that_replaces_the_temporary_gets_the_umask_mode(tmp_path, umask_022):
    import torch
    from safetensors.torch import save_file

    with atomic_path(tmp_path / "model.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, tmp)  # safetensors writes a new 0o600 file in the temporary's place
    with atomic_path(tmp_path / "replaced.bin") as tmp:
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    assert _mode(tmp_path / "model.safetensors") == _mode(tmp_path / "replaced.bin") == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "model.bin"  # the folder is created
    atomic_write_bytes(path, b"old")

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert [p.name for p in path.parent.iterdir()] == ["model.bin"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "weights"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "one.txt").write_text("1")
    with pytest.raises(RuntimeError, match="half way"), atomic_dir(target) as tmp:
        (tmp / "two.txt").write_text("2")
        raise RuntimeError("half way")
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]
    assert [p.name for p in target.iterdir()] == ["one.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "three.txt").write_text("3")
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]  # the old folder is gone too
    assert [p.name for p in target.iterdir()] == ["three.txt"]


def test_atomic_dir_restores_the_old_folder_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "weights"
    with atomic_dir(target) as tmp:
        (tmp / "one.txt").write_text("1")
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.fspath(dst) == os.fspath(target) and os.fspath(src).endswith(".tmp"):  # the new folder's rename
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"), atomic_dir(target) as tmp:
        (tmp / "two.txt").write_text("2")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]
    assert [p.name for p in target.iterdir()] == ["one.txt"]
