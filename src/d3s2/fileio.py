"""Files and folders written whole or not at all: a temporary next to the target, renamed over it when complete.

A crash or an exception leaves either the old file (folder) or the new one, never a partial one, and no temporary
behind. New files and folders get the permissions a plain ``open`` / ``mkdir`` would give them (0o666 / 0o777 less
the umask), not ``mkstemp``'s 0o600 or ``mkdtemp``'s 0o700.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_dir", "atomic_path", "atomic_write", "atomic_write_bytes", "atomic_write_text"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary file next to ``path`` for a writer that takes a file name; when the block ends
    without an exception it is synced and renamed to ``path``, otherwise removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path, _new_file)
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        if tmp.stat().st_mode & 0o777 != mode:  # a writer that replaces the file (safetensors' save_file: 0o600)
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written temporary behind.
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # makes the rename itself durable


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder next to ``path`` to fill; when the block ends without an exception it takes the
    place of ``path`` (a folder already there is removed), otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path, os.mkdir)
    old = None
    try:
        yield tmp
        if path.exists():  # a rename onto a non-empty folder fails: move the old one aside first
            old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a binary file that becomes ``path`` once it returns (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` written to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) written to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode())


def _create_temporary(path: Path, create: Callable[[Path], None]) -> Path:
    """A hidden name next to ``path`` that ``create`` (failing on an existing name) made; the umask applies."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary name next to {path}")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _fsync(path: Path) -> None:
    # Not supported on every platform and file system (directories on Windows): best effort there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
