"""The one interface every tier backend implements: a small object store.

Keys are '/'-separated relative paths. Objects are immutable once written; a write
is durable when :meth:`ObjectStore.put` returns (a backend fsyncs or the equivalent).
Atomic visibility of a checkpoint is built on :meth:`ObjectStore.put_atomic`, which
makes an object appear whole or not at all (temporary name + rename).
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ByteRange:
    """A byte range of an object: ``start`` inclusive, ``length`` bytes.

    A negative ``start`` counts from the end (``ByteRange(-16, 16)`` is the last 16 bytes).
    """

    start: int
    length: int

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"ByteRange length must be >= 0, got {self.length}")


class ObjectStore(abc.ABC):
    """A flat store of immutable byte objects under a root URL."""

    #: URL scheme(s) the backend serves, e.g. ``("file",)``.
    schemes: tuple[str, ...] = ()
    #: Whether objects survive the loss of this process (memory does not).
    durable: bool = True

    def __init__(self, url: str) -> None:
        self.url = url

    # --- writes -----------------------------------------------------------------
    @abc.abstractmethod
    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write ``data`` (one buffer or a sequence written back to back) as ``key``, durably."""

    def put_atomic(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write ``key`` so readers see the whole object or none of it. Default: ``put``."""
        self.put(key, data)

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; returns how many were removed."""
        keys = list(self.list(prefix))
        for k in keys:
            self.delete(k)
        return len(keys)

    def barrier(self, prefix: str) -> None:
        """Make the names of everything written under ``prefix`` durable (e.g. fsync directories).

        Called before a commit marker is written. Default: nothing to do.
        """

    # --- reads ------------------------------------------------------------------
    @abc.abstractmethod
    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | None:
        """Return the object's bytes (or a range of them); ``None`` if the key is missing."""

    def get_into(self, key: str, out: memoryview, offset: int = 0) -> bool:
        """Read ``len(out)`` bytes of ``key`` starting at ``offset`` into ``out``.

        Returns False when the key is missing. Backends override this to avoid a copy.
        """
        data = self.get(key, ByteRange(offset, len(out)))
        if data is None:
            return False
        if len(data) != len(out):
            raise EOFError(f"{key}: wanted {len(out)} bytes at {offset}, object has {len(data)}")
        out[:] = data
        return True

    @abc.abstractmethod
    def size(self, key: str) -> int | None:
        """Size of the object in bytes, ``None`` if missing."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterable[str]:
        """Keys starting with ``prefix`` (recursive), in no particular order."""

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Immediate child 'directories' under ``prefix`` (names without trailing '/')."""
        out = set()
        plen = len(prefix)
        for k in self.list(prefix):
            rest = k[plen:]
            if "/" in rest:
                out.add(rest.split("/", 1)[0])
        return sorted(out)

    # --- lifecycle --------------------------------------------------------------
    def close(self) -> None:
        """Release connections and handles."""

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def as_buffers(data: Buffer | Sequence[Buffer]) -> builtins.list[memoryview]:
    """Normalise ``put``'s argument to a list of flat byte memoryviews.

    One buffer-like object (bytes, bytearray, memoryview, a numpy array, ...) is one buffer;
    anything else is a sequence of them.
    """
    try:
        parts: Sequence[Buffer] = [memoryview(data)]  # type: ignore[arg-type]
    except TypeError:
        parts = data  # type: ignore[assignment]
    out = []
    for p in parts:
        mv = memoryview(p)
        out.append(mv if mv.format == "B" and mv.ndim == 1 and mv.c_contiguous else mv.cast("B"))
    return out
