"""Raw writes for the benchmarks' baselines: the bytes to disk with nothing else (one place for every script)."""

from __future__ import annotations

import os

_ALIGN = 4096


def write_direct(path: str, buf: memoryview, *, piece: int = 64 << 20) -> None:
    """Write ``buf`` to ``path`` and fsync: its page-aligned head with ``O_DIRECT`` (no page-cache copy, as
    asymstore's local tier writes) in ``piece``-sized writes, the unaligned tail normally. ``buf`` must start
    on a page (an ``mmap``); where the file system refuses ``O_DIRECT`` all of it is written normally."""
    head = len(buf) // _ALIGN * _ALIGN
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except (OSError, AttributeError):  # no direct I/O here (tmpfs, macOS)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pos = 0
    try:
        while pos < head:
            pos += os.pwrite(fd, buf[pos : min(pos + piece, head)], pos)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY)
    try:
        while pos < len(buf):
            pos += os.pwrite(fd, buf[pos:], pos)
        os.fsync(fd)
    finally:
        os.close(fd)
