"""``file:///path`` or a plain path: objects as files in a local directory (the NVMe tier).

Writes go straight from the caller's buffers to the file with ``os.writev`` and are
fsynced; :meth:`LocalObjectStore.barrier` fsyncs the directories, so a commit marker
written afterwards is only ever visible after the data it describes is durable.
"""

from __future__ import annotations

import builtins
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from urllib.parse import unquote, urlparse

from asymstore.errors import BackendUnavailableError, ConfigError

from .base import Buffer, ByteRange, Capabilities, ObjectStore, as_buffers

_IOV_MAX = 512
_DIRECT_ALIGN = 4096
_DIRECT_MIN = 1 << 20


def _address(buf: memoryview) -> int:
    """The memory address of a buffer's first byte."""
    import numpy as np

    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) if len(buf) else 0


def path_from_url(url: str) -> str:
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    u = urlparse(url)
    if u.scheme != "file":
        raise ConfigError(f"not a file URL: {url}")
    if u.netloc not in ("", "localhost"):
        raise ConfigError(f"file URLs must be local (file:///abs/path), got host {u.netloc!r} in {url}")
    return os.path.abspath(unquote(u.path))


class LocalObjectStore(ObjectStore):
    capabilities = Capabilities(durable=True, volatile=False, atomic_rename=True, ranged_reads=True)

    def __init__(self, url: str, *, fsync: bool = True, direct_io: bool = True) -> None:
        super().__init__(url)
        self.root = path_from_url(url)
        self.fsync = fsync
        #: large page-aligned buffers (host snapshot slots) are written with O_DIRECT where supported
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise BackendUnavailableError(f"cannot create checkpoint directory {self.root}: {e}") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise BackendUnavailableError(f"checkpoint directory {self.root} is not writable")

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ConfigError(f"invalid object key {key!r}")
        return os.path.join(self.root, key)

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

    def _write_direct_head(self, path: str, first: memoryview) -> int:
        """Write the page-aligned head of a large first buffer with O_DIRECT (no page-cache copy,
        no kernel write-back work competing with training); returns the bytes written (0: not used)."""
        n = len(first) // _DIRECT_ALIGN * _DIRECT_ALIGN
        if n < _DIRECT_MIN or _address(first) % _DIRECT_ALIGN:
            return 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError:  # the file system does not do direct I/O (tmpfs, ...): buffered it is
            self.direct_io = False
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
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._write_file(path, data)

    def put_atomic(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        path = self._path(key)
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            self._write_file(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._fsync_dir(d)

    def _fsync_dir(self, d: str) -> None:
        if not self.fsync:
            return
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def barrier(self, prefix: str) -> None:
        top = self._path(prefix.rstrip("/")) if prefix else self.root
        if not os.path.isdir(top):
            return
        for dirpath, _dirs, _files in os.walk(top):
            self._fsync_dir(dirpath)
        self._fsync_dir(os.path.dirname(top) if prefix else top)

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> int:
        p = self._path(prefix.rstrip("/")) if prefix else self.root
        if prefix.endswith("/") and os.path.isdir(p):
            n = sum(len(f) for _, _, f in os.walk(p))
            shutil.rmtree(p, ignore_errors=True)
            return n
        return super().delete_prefix(prefix)

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            size = os.fstat(fd).st_size
            if byte_range is None:
                start, length = 0, size
            else:
                start = byte_range.start if byte_range.start >= 0 else max(size + byte_range.start, 0)
                length = max(min(byte_range.length, size - start), 0)
            buf = bytearray(length)
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
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            self._pread_into(fd, out, offset)
            return True
        finally:
            os.close(fd)

    def size(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list(self, prefix: str = "") -> Iterable[str]:
        # walk only the directory the prefix points into
        base_dir = os.path.dirname(prefix)
        top = os.path.join(self.root, base_dir) if base_dir else self.root
        out = []
        for dirpath, _dirs, files in os.walk(top):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                k = f if rel == "." else f"{rel}/{f}"
                if k.startswith(prefix) and ".tmp-" not in f:
                    out.append(k)
        return out

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        top = os.path.join(self.root, prefix) if prefix else self.root
        try:
            return sorted(e.name for e in os.scandir(top) if e.is_dir())
        except FileNotFoundError:
            return []
