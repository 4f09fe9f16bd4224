"""``memory://name``: objects in this process's memory (a fast, volatile tier; also a test fake).

Backends opened on the same name share one namespace (a dict of key -> bytes) for the life of the process.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Sequence

from .base import Buffer, ByteRange, Capabilities, ObjectStore, as_buffers, check_key, check_prefix

_NAMESPACES: dict[str, dict[str, bytes]] = {}
#: one lock for every namespace: it only guards dict operations (copies happen outside it)
_LOCK = threading.Lock()
#: serialises create_exclusive (check, then put) across every namespace
_CREATE_LOCK = threading.RLock()


def namespace(name: str) -> dict[str, bytes]:
    """The live objects of namespace ``name`` (created empty if new): raw access that bypasses the backend."""
    with _LOCK:
        return _NAMESPACES.setdefault(name, {})


def drop_namespace(name: str) -> None:
    """Forget namespace ``name`` and its objects (test clean-up)."""
    with _LOCK:
        _NAMESPACES.pop(name, None)


class MemoryObjectStore(ObjectStore):
    """Objects as immutable ``bytes`` in a process-wide namespace named by the URL (``memory://name``)."""

    capabilities = Capabilities(durable=False, volatile=True, atomic_rename=False, ranged_reads=True)

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.name = url.split("://", 1)[1] if "://" in url else url
        self._objects = namespace(self.name)

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Store a copy of ``data`` as ``key``; replacing the dict entry is atomic, so this is also ``put_atomic``."""
        check_key(key)
        blob = b"".join(as_buffers(data))
        with _LOCK:
            self._objects[key] = blob

    def create_exclusive(self, key: str, data: Buffer | Sequence[Buffer]) -> bool:
        """Store ``data`` as ``key`` unless ``key`` exists: the check and the :meth:`put` hold one lock that every
        ``create_exclusive`` takes, so of racing creators exactly one writes."""
        check_key(key)
        with _CREATE_LOCK:
            if self.exists(key):
                return False
            self.put(key, data)
        return True

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        check_key(key)
        with _LOCK:
            self._objects.pop(key, None)

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | None:
        """The object's bytes (or a slice of them), ``None`` if missing."""
        check_key(key)
        with _LOCK:
            blob = self._objects.get(key)
        if blob is None or byte_range is None:
            return blob
        start, end = byte_range.resolve(len(blob))
        return blob[start:end]

    def size(self, key: str) -> int | None:
        """Length of the object, ``None`` if missing."""
        check_key(key)
        with _LOCK:
            blob = self._objects.get(key)
        return None if blob is None else len(blob)

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Keys starting with ``prefix`` (a snapshot taken under the lock)."""
        check_prefix(prefix)
        with _LOCK:
            return [k for k in self._objects if k.startswith(prefix)]

    def corrupt(self, key: str, offset: int) -> None:
        """Flip one byte (fault injection for tests)."""
        with _LOCK:
            b = bytearray(self._objects[key])
            b[offset] ^= 0xFF
            self._objects[key] = bytes(b)
