"""``file:///path`` or a plain path: objects as files in a local directory (the NVMe tier).

Writes go straight from the caller's buffers to the file with ``os.writev`` and are
fsynced; :meth:`LocalObjectStore.barrier` fsyncs the directories, so a commit marker
written afterwards is only ever visible after the data it describes is durable.
"""

from __future__ import annotations

import builtins
import os
import re
import shutil
import stat
from collections.abc import Sequence
from urllib.parse import unquote, urlparse

from asymstore.errors import BackendUnavailableError, ConfigError, CorruptCheckpointError
from asymstore.files import atomic_write, exclusive_write, fsync_dir, remove_stale_temporaries
from asymstore.prefault import address

from .base import Buffer, ByteRange, Capabilities, ObjectStore, as_buffers, check_key, check_prefix, dir_prefix

_IOV_MAX = 512
_DIRECT_ALIGN = 4096
_DIRECT_MIN = 1 << 20
#: the temporary name :func:`asymstore.files.atomic_write` gives a file while it is written
_TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{12}$")


def _is_temp(name: str) -> bool:
    """Whether a file name is an unfinished ``put_atomic`` (listings skip it)."""
    return _TEMP_NAME.search(name) is not None


def path_from_url(url: str) -> str:
    """The absolute local path of a ``file://`` URL or a plain path (``~`` expanded)."""
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    u = urlparse(url)
    if u.scheme != "file":
        raise ConfigError(f"not a file URL: {url}")
    if u.netloc not in ("", "localhost"):
        raise ConfigError(f"file URLs must be local (file:///abs/path), got host {u.netloc!r} in {url}")
    return os.path.abspath(unquote(u.path))


class LocalObjectStore(ObjectStore):
    """Objects as files below a local directory; ``fsync`` makes every put durable, ``direct_io`` bypasses the
    page cache for large page-aligned buffers."""

    capabilities = Capabilities(durable=True, volatile=False, atomic_rename=True, ranged_reads=True)

    def __init__(self, url: str, *, fsync: bool = True, direct_io: bool = True) -> None:
        super().__init__(url)
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(
                f"empty checkpoint directory {url!r}: name the directory explicitly (e.g. './checkpoints'); "
                "an empty path would write into the current directory"
            )
        self.root = path_from_url(url)
        self.fsync = fsync
        #: large page-aligned buffers (host snapshot slots) are written with O_DIRECT where supported
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise BackendUnavailableError(f"cannot create checkpoint directory {self.root}: {e}") from e
        self._real_root = os.path.join(os.path.realpath(self.root), "")  # reads stay below it (symlinks)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise BackendUnavailableError(f"checkpoint directory {self.root} is not writable")

    def _path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def _read_path(self, key: str) -> str:
        """The file of ``key`` to read: refused when a symbolic link leads it out of the store root."""
        path = self._path(key)
        real = os.path.realpath(path)
        if not real.startswith(self._real_root):
            raise CorruptCheckpointError(
                f"{key}: a symbolic link leads out of the store root {self.root} (to {real}); refused", (key,)
            )
        return path

    def _dir(self, prefix: str) -> str:
        """The directory a directory prefix names (``''``: the root)."""
        d = dir_prefix(prefix)
        return os.path.join(self.root, d.rstrip("/")) if d else self.root

    def _write_file(self, path: str, data: Buffer | Sequence[Buffer]) -> None:
        bufs = [b for b in as_buffers(data) if len(b)]
        offset = 0
        if self.direct_io and bufs:
            offset = self._write_direct_head(path, bufs[0])
            if offset:
                bufs[0] = bufs[0][offset:]
                bufs = [b for b in bufs if len(b)]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if offset else os.O_TRUNC), 0o644)
        try:
            if offset:
                os.lseek(fd, offset, os.SEEK_SET)
            i = 0
            while i < len(bufs):
                n = os.writev(fd, bufs[i : i + _IOV_MAX])
                while n > 0:  # consume what was written; a short write resumes mid-buffer
                    if n >= len(bufs[i]):
                        n -= len(bufs[i])
                        i += 1
                    else:
                        bufs[i] = bufs[i][n:]
                        n = 0
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _direct_head(self, buf: memoryview, offset: int = 0) -> int:
        """How many leading bytes of ``buf`` may move with O_DIRECT at file ``offset`` (0: none): the
        page-aligned head of a large, page-aligned buffer at a page-aligned offset."""
        n = len(buf) // _DIRECT_ALIGN * _DIRECT_ALIGN
        if not self.direct_io or n < _DIRECT_MIN or address(buf) % _DIRECT_ALIGN or offset % _DIRECT_ALIGN:
            return 0
        return n

    def _open_direct(self, path: str, flags: int) -> int | None:
        """``path`` opened with ``O_DIRECT`` added to ``flags``; ``None`` (and no more direct I/O on this store)
        where the file system refuses it (tmpfs, ...)."""
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError:
            self.direct_io = False
            return None

    def _write_direct_head(self, path: str, first: memoryview) -> int:
        """Write the page-aligned head of a large first buffer with O_DIRECT (no page-cache copy,
        no kernel write-back work competing with training); returns the bytes written (0: not used)."""
        n = self._direct_head(first)
        fd = self._open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if n else None
        if fd is None:
            return 0
        try:
            done = 0
            while done < n:
                done += os.pwrite(fd, first[done:n], done)
        except OSError:
            os.close(fd)
            self.direct_io = False
            return 0
        os.close(fd)
        return n

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write ``key`` in place (``O_DIRECT`` head + ``writev``), fsynced when ``fsync``."""
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._write_file(path, data)

    def put_atomic(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write a temporary file the way :meth:`put` does, rename it over ``key``, fsync the directory."""
        atomic_write(self._path(key), lambda tmp: self._write_file(tmp, data), fsync_parent=self.fsync)

    def create_exclusive(self, key: str, data: Buffer | Sequence[Buffer]) -> bool:
        """Write a temporary file the way :meth:`put` does and hard-link it as ``key`` unless ``key`` exists
        (:func:`asymstore.files.exclusive_write`); the directory is fsynced when ``fsync``."""
        path = self._path(key)
        return exclusive_write(path, lambda tmp: self._write_file(tmp, data), fsync_parent=self.fsync)

    def remove_temporaries(self, prefix: str, *, older_than_s: float = 0.0) -> int:
        """Unlink the temporaries in the directory ``prefix`` whose writer is gone or that are unchanged for
        ``older_than_s`` seconds (in the root: also in directories that hold only temporaries)."""
        return remove_stale_temporaries(self._dir(prefix), older_than_s=older_than_s, unlisted_dirs=not prefix)

    def barrier(self, prefix: str) -> None:
        """Fsync every directory under the directory ``prefix`` and its parent (so their names are durable)."""
        top = self._dir(prefix)
        if not self.fsync or not os.path.isdir(top):
            return
        for dirpath, _dirs, _files in os.walk(top):
            fsync_dir(dirpath)
        fsync_dir(os.path.dirname(top) if prefix else top)

    def delete(self, key: str) -> None:
        """Unlink the file of ``key`` if present (its directories stay; empty ones are never listed)."""
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            pass

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with ``prefix``: whole directories with one ``rmtree`` each."""
        check_prefix(prefix)
        if prefix.endswith("/"):  # a directory: remove it whole, not just what it holds
            top = self._dir(prefix)
            if not os.path.isdir(top):
                return 0
            n = _count_objects(top)
            shutil.rmtree(top, ignore_errors=True)
            return n
        parent_key, _, partial = prefix.rpartition("/")
        parent = os.path.join(self.root, parent_key) if parent_key else self.root
        try:
            entries = [e for e in os.scandir(parent) if e.name.startswith(partial)]
        except (FileNotFoundError, NotADirectoryError):
            return 0
        n = 0
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                n += _count_objects(e.path)
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                n += 0 if _is_temp(e.name) else 1
                try:
                    os.unlink(e.path)
                except FileNotFoundError:
                    pass
        return n

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | None:
        """Read the object (or a range of it, resolved by :meth:`ByteRange.resolve`) with ``preadv``."""
        try:
            fd = os.open(self._read_path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return None
            start, end = (0, st.st_size) if byte_range is None else byte_range.resolve(st.st_size)
            buf = bytearray(end - start)
            self._pread_into(fd, memoryview(buf), start)
            return bytes(buf)
        finally:
            os.close(fd)

    @staticmethod
    def _pread_into(fd: int, out: memoryview, offset: int) -> None:
        got = 0
        while got < len(out):
            n = os.preadv(fd, [out[got:]], offset + got)
            if n == 0:
                raise EOFError(f"short read: wanted {len(out)} bytes at {offset}, got {got}")
            got += n

    def get_into(self, key: str, out: memoryview, offset: int = 0) -> bool:
        """Read ``len(out)`` bytes at ``offset`` (negative: from the end) straight into ``out``: the page-aligned
        head of a large page-aligned ``out`` with ``O_DIRECT`` (the disk writes into ``out``, no page-cache
        copy: a restore reads at the device's speed), the rest normally."""
        path = self._read_path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return False
            start, end = ByteRange(offset, len(out)).resolve(st.st_size)
            if end - start != len(out):
                raise EOFError(f"{key}: wanted {len(out)} bytes at {offset}, object has {st.st_size}")
            done = self._read_direct_head(path, out, start)
            self._pread_into(fd, out[done:], start + done)
            return True
        finally:
            os.close(fd)

    def _read_direct_head(self, path: str, out: memoryview, offset: int) -> int:
        """Read the page-aligned head of ``out`` from ``offset`` with O_DIRECT; the bytes read (0: not used)."""
        n = self._direct_head(out, offset)
        fd = self._open_direct(path, os.O_RDONLY) if n else None
        if fd is None:
            return 0
        # (a new ``out``'s pages are faulted in ahead by the caller: CheckpointReader.read_all_into)
        got = 0
        try:
            while got < n:
                k = os.preadv(fd, [out[got:n]], offset + got)
                if k <= 0:
                    break
                got += k
        except OSError:  # refused mid-way (an alignment this file system wants larger): the rest normally
            pass
        finally:
            os.close(fd)
        return got

    def size(self, key: str) -> int | None:
        """Size of the file of ``key``, ``None`` if it is missing, a directory, or reached through a symbolic link
        out of the store root."""
        try:
            path = self._path(key)
            if not os.path.realpath(path).startswith(self._real_root):
                return None  # a symbolic link out of the store root is no object of this store
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return None if stat.S_ISDIR(st.st_mode) else st.st_size

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Keys starting with ``prefix``: a walk of the deepest directory the prefix names, temporaries skipped."""
        check_prefix(prefix)
        base_dir = prefix.rpartition("/")[0]
        top = os.path.join(self.root, base_dir) if base_dir else self.root
        if not os.path.realpath(top).startswith(self._real_root) and top != self.root:
            return []  # a symbolic link out of the store root: nothing of this store lies there
        out = []
        for dirpath, _dirs, files in os.walk(top):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                k = f if rel == "." else f"{rel}/{f}"
                if (
                    k.startswith(prefix)
                    and not _is_temp(f)
                    and not _link_out(os.path.join(dirpath, f), self._real_root)
                ):
                    out.append(k)
        return out

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Child directories of the directory ``prefix`` that hold at least one object, sorted."""
        try:
            entries = list(os.scandir(self._dir(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) and _holds_object(e.path))


def _link_out(path: str, real_root: str) -> bool:
    """Whether ``path`` is a symbolic link to somewhere outside ``real_root``."""
    return os.path.islink(path) and not os.path.realpath(path).startswith(real_root)


def _holds_object(path: str) -> bool:
    """Whether directory ``path`` holds an object at any depth (stops at the first one)."""
    return any(not _is_temp(f) for _, _, files in os.walk(path) for f in files)


def _count_objects(path: str) -> int:
    """How many objects lie below directory ``path``."""
    return sum(not _is_temp(f) for _, _, files in os.walk(path) for f in files)
