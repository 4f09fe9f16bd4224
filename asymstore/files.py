"""Atomic writes of local files: the one temporary-name + fsync + rename writer for the local filesystem.

Used by the local tier backend's ``put_atomic``, by ``asymstore export`` and by the integrations' pointer files,
so a crash leaves the old file or the whole new one, never a part. :func:`exclusive_write` is the no-replace
variant (a hard link of the complete temporary: of two writers exactly one creates the file), and
:func:`remove_stale_temporaries` removes the temporaries a killed writer left behind.

A temporary is named ``<name>.tmp-<12 hex digits>`` next to its file (:data:`TEMP_NAME` matches it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

#: the name of an unfinished atomic or exclusive write (a temporary next to its file)
TEMP_NAME = re.compile(r"\.tmp-([0-9a-f]{12})$")


def _machine_tag() -> str:
    """4 hex digits naming this machine and boot (host name and boot id)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{socket.gethostname()}/{boot}".encode()).hexdigest()[:4]


_MACHINE = _machine_tag()
_COUNTER = itertools.count()


def temp_name(path: str) -> str:
    """A fresh temporary name next to ``path``: ``.tmp-`` and 12 hex digits, this machine's tag (4), the
    writer's pid (6) and a per-process counter (2), so a clean-up can tell a killed writer's temporary."""
    return f"{path}.tmp-{_MACHINE}{os.getpid() & 0xFFFFFF:06x}{next(_COUNTER) & 0xFF:02x}"


def temp_writer_dead(name: str) -> bool:
    """Whether the temporary ``name`` was written by a process of this machine that is gone."""
    m = TEMP_NAME.search(name)
    if m is None or m.group(1)[:4] != _MACHINE:
        return False
    pid = int(m.group(1)[4:10], 16)
    if pid == os.getpid() & 0xFFFFFF:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def is_temp(name: str) -> bool:
    """Whether a file name is an unfinished atomic or exclusive write."""
    return TEMP_NAME.search(name) is not None


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
    tmp = temp_name(path)
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


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: str, dst: str) -> None:
    """``renameat2(src, dst, RENAME_NOREPLACE)`` (Linux): ``FileExistsError`` when ``dst`` exists."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", dst)
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def exclusive_write(path: str, write: Callable[[str], None], *, fsync_parent: bool = True) -> bool:
    """Create ``path`` with ``write(tmp_path)`` only if it does not exist; returns whether this call created it.

    The complete temporary is hard-linked to ``path`` (``link`` never replaces; where the file system has no
    hard links, ``renameat2(RENAME_NOREPLACE)``), so readers see no file or the whole one, and of several
    writers racing for ``path`` exactly one gets True. A file that exists is never touched.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    if os.path.lexists(path):
        return False
    tmp = temp_name(path)
    try:
        write(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except FileNotFoundError:  # the temporary was removed by a clean-up of a directory another writer claimed
            if os.path.lexists(path):
                return False
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            try:
                _rename_noreplace(tmp, path)
            except FileExistsError:
                return False
            except OSError as e2:
                if e2.errno == errno.EEXIST:
                    return False
                raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    if fsync_parent:
        fsync_dir(d)
    return True


def remove_stale_temporaries(directory: str, *, older_than_s: float = 0.0, unlisted_dirs: bool = False) -> int:
    """Remove the temporaries directly in ``directory`` whose writer is gone (a process of this machine that no
    longer exists) or that were not modified for ``older_than_s`` seconds; returns how many.

    A writer that is still writing a temporary keeps touching it, so a temporary unchanged for longer than any
    write stalls is a killed writer's too (e.g. one from another machine sharing the directory). With
    ``unlisted_dirs`` the same is done in the subdirectories that hold no object (only temporaries, which no
    listing shows: a writer killed while it created its directory's first object).
    """
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    now = time.time()
    n = 0
    for e in entries:
        try:
            if unlisted_dirs and e.is_dir(follow_symlinks=False):
                files = [f for _, _, fs in os.walk(e.path) for f in fs]
                if files and all(is_temp(f) for f in files):
                    for d, _, _fs in os.walk(e.path):
                        n += remove_stale_temporaries(d, older_than_s=older_than_s)
                continue
            if not is_temp(e.name):
                continue
            if not temp_writer_dead(e.name) and now - e.stat(follow_symlinks=False).st_mtime < older_than_s:
                continue
            os.unlink(e.path)
            n += 1
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
    return n
