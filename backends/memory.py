"""``memory://name``: objects in this process's memory (a fast, volatile tier; also a test fake)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from .base import Buffer, ByteRange, Capabilities, ObjectStore, as_buffers

_NAMESPACES: dict[str, dict[str, bytes]] = {}
_LOCK = threading.Lock()


class MemoryObjectStore(ObjectStore):
    capabilities = Capabilities(durable=False, volatile=True, atomic_rename=False, ranged_reads=True)

    def __init__(self, url: str) -> None:
        super().__init__(url)
        name = url.split("://", 1)[1] if "://" in url else url
        with _LOCK:
            self._objects = _NAMESPACES.setdefault(name, {})
        self._lock = threading.Lock()

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        blob = b"".join(as_buffers(data))
        with self._lock:
            self._objects[key] = blob

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | None:
        with self._lock:
            blob = self._objects.get(key)
        if blob is None:
            return None
        if byte_range is None:
            return blob
        start = byte_range.start if byte_range.start >= 0 else max(len(blob) + byte_range.start, 0)
        return blob[start : start + byte_range.length]

    def size(self, key: str) -> int | None:
        with self._lock:
            blob = self._objects.get(key)
        return None if blob is None else len(blob)

    def list(self, prefix: str = "") -> Iterable[str]:
        with self._lock:
            return [k for k in self._objects if k.startswith(prefix)]

    def corrupt(self, key: str, offset: int) -> None:
        """Flip one byte (fault injection for tests)."""
        with self._lock:
            b = bytearray(self._objects[key])
            b[offset] ^= 0xFF
            self._objects[key] = bytes(b)


def drop_namespace(name: str) -> None:
    with _LOCK:
        _NAMESPACES.pop(name, None)
