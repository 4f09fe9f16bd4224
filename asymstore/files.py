"""Atomic writes of local files: the one temporary-name + fsync + rename writer for the local filesystem.

Used by the local tier backend's ``put_atomic``, by ``asymstore export`` and by the integrations' pointer files,
so a crash leaves the old file or the whole new one, never a part.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO


def fsync_dir(path: str) -> None:
    """Make the names in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: str, *, fsync_parent: bool) -> Iterator[str]:
    """Yield a temporary name next to ``path``; when the block succeeds, rename it over ``path`` (and fsync
    the directory); when it fails, remove it and leave ``path`` as it was."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync_parent:
        fsync_dir(d)


@contextlib.contextmanager
def atomic_file(path: str, *, fsync: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path`` for writing; on success it replaces ``path`` atomically.

    With ``fsync`` the data is flushed to disk before the rename and the directory after it. On any error the
    temporary file is removed and ``path`` is left as it was.
    """
    with _replacing(path, fsync_parent=fsync) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def atomic_write(path: str, write: Callable[[str], None], *, fsync_parent: bool = True) -> None:
    """Write ``path`` atomically with ``write(tmp_path)``, which creates and fills (and fsyncs) ``tmp_path``.

    For writers that need the path itself (e.g. direct I/O); :func:`atomic_file` covers the plain case.
    """
    with _replacing(path, fsync_parent=fsync_parent) as tmp:
        write(tmp)
