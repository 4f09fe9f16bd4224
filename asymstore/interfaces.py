"""Every interface between asymstore's core and its replaceable parts, in one place.

* :class:`ObjectStore`: the one interface a tier backend implements (a flat store of immutable byte
  objects), with its :class:`Capabilities`. The core decides by capability, never by URL scheme.
* :class:`StreamSource`: where a writer reads a checkpoint's byte stream from when it is not one buffer.
* :class:`RangeSource`: what lazy reads read byte ranges of a committed stream from.
* :class:`RetentionPolicy`: which of a tier's steps to keep and which to receive.
* :class:`CopyExecutor`: where copy ranges of a snapshot are copied into a host slot (thread or CUDA stream).

Backends, policies and executors implement these; nothing in the core depends on a concrete one. The
behaviour every :class:`ObjectStore` must have is pinned by the conformance kit,
:mod:`asymstore.testing.conformance`, which every backend's tests run.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from .errors import InvalidKeyError

if TYPE_CHECKING:
    import torch

    from .layout import Layout

Buffer = bytes | bytearray | memoryview


# --- object stores (tier backends) ---------------------------------------------------------------------
@dataclass(frozen=True)
class ByteRange:
    """A byte range of an object: ``start`` inclusive, ``length`` bytes.

    A negative ``start`` counts from the end (``ByteRange(-16, 16)`` is the last 16 bytes). A range past the
    end of the object is truncated, never padded.
    """

    start: int
    length: int

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"ByteRange length must be >= 0, got {self.length}")

    def resolve(self, size: int) -> tuple[int, int]:
        """``(start, end)`` of this range within an object of ``size`` bytes (clamped to it)."""
        start = self.start if self.start >= 0 else max(size + self.start, 0)
        start = min(start, size)
        return start, min(start + self.length, size)


@dataclass(frozen=True)
class Capabilities:
    """What a backend guarantees; the core chooses its behaviour from these, never from a URL scheme."""

    #: objects survive the loss of this process and of the machine's power once ``put`` returns (fsync or a
    #: replicated write); a tier that is not durable never counts as a safe copy for retention
    durable: bool
    #: objects live in this process's memory: a write costs a memory copy, so compression never pays and there
    #: is no per-write latency to amortise (B* is bounded by the staging budget alone)
    volatile: bool
    #: ``put_atomic`` is a real rename of a complete temporary object (else: the object is written in one call
    #: that readers cannot observe half-done, e.g. under a lock)
    atomic_rename: bool
    #: ``get`` with a :class:`ByteRange` reads only those bytes (else: the backend fetches the whole object)
    ranged_reads: bool


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise :class:`~asymstore.errors.InvalidKeyError`.

    A key is a relative, '/'-separated path of non-empty components, none of them ``.`` or ``..``, with no
    backslash or NUL character. Every backend checks keys with this one function, so a bad key fails the same
    way everywhere.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"object key must be a non-empty str, got {key!r}")
    if key.startswith("/") or "\\" in key or "\0" in key:
        raise InvalidKeyError(f"invalid object key {key!r}: keys are relative '/'-separated paths")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKeyError(f"invalid object key {key!r}: empty, '.' or '..' path component")
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid listing prefix, else raise :class:`~asymstore.errors.InvalidKeyError`.

    A listing prefix is the leading characters of keys: ``''``, or a string whose components before its last
    '/' are valid as in :func:`check_key` (the last one may be partial: ``'step_'``, or empty: ``'step_1/'``).
    """
    if not isinstance(prefix, str):
        raise InvalidKeyError(f"listing prefix must be a str, got {prefix!r}")
    if "\\" in prefix or "\0" in prefix:
        raise InvalidKeyError(f"invalid listing prefix {prefix!r}: no backslash or NUL in keys")
    if "/" in prefix:
        check_key(prefix[: prefix.rfind("/")])
    return prefix


def dir_prefix(prefix: str) -> str:
    """The directory form of a listing prefix: ``''`` or ending with one '/' (``'step_1'`` -> ``'step_1/'``)."""
    if not prefix:
        return ""
    check_key(prefix.rstrip("/") or "/")
    return prefix.rstrip("/") + "/"


class ObjectStore(abc.ABC):
    """A flat store of immutable byte objects under a root URL.

    Keys are '/'-separated relative paths (:func:`check_key`). A write is durable when :meth:`put` returns if
    :attr:`capabilities` says ``durable``. A missing key is never an error for reads: :meth:`get` and
    :meth:`size` return ``None``. Directories are implicit: a directory exists while an object lies under it.
    """

    #: what this backend guarantees (subclasses set it)
    capabilities: ClassVar[Capabilities] = Capabilities(
        durable=True, volatile=False, atomic_rename=False, ranged_reads=True
    )

    def __init__(self, url: str) -> None:
        self.url = url

    @property
    def durable(self) -> bool:
        """Shorthand for ``capabilities.durable``."""
        return self.capabilities.durable

    # --- writes ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write ``data`` (one buffer or a sequence written back to back) as ``key``, replacing it."""

    def put_atomic(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write ``key`` so readers see the old object, or the whole new one, never a part. Default: ``put``."""
        self.put(key, data)

    def create_exclusive(self, key: str, data: Buffer | Sequence[Buffer]) -> bool:
        """Create ``key`` holding ``data`` only if no object ``key`` exists; returns whether this call created it.

        The contract every backend must keep (the conformance kit checks it with racing writers):

        * **exclusive**: of any number of writers (threads, processes, machines) racing to create the same key,
          exactly one gets True; the others get False;
        * **no-replace**: an existing object is never modified, whatever it holds;
        * **atomic**: readers see no object or the whole of ``data``, never a part (as :meth:`put_atomic`);
        * **durable** on return when the backend is ``durable``; a failure raises and leaves no object.

        asymstore claims step and rank directories and writes commit markers with it, so two processes saving
        the same step into one root cannot both write it. This default (``exists`` then :meth:`put_atomic`) is
        exclusive only against a single writer: a backend shared by processes must override it (a hard link or
        no-replace rename of a complete temporary, a create-without-overwrite, a conditional put).
        """
        if self.exists(key):
            return False
        self.put_atomic(key, data)
        return True

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing key is not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with ``prefix``; returns how many were removed."""
        keys = list(self.list(prefix))
        for k in keys:
            self.delete(k)
        return len(keys)

    def remove_temporaries(self, prefix: str, *, older_than_s: float = 0.0) -> int:
        """Remove unfinished temporaries of :meth:`put_atomic` / :meth:`create_exclusive` (a killed writer's)
        lying directly in the directory ``prefix`` and not modified for ``older_than_s`` seconds; how many.

        Listings never show temporaries; this is how crash leftovers of them are cleaned. Default: a backend
        whose writes leave no temporaries has none to remove.
        """
        return 0

    def barrier(self, prefix: str) -> None:  # noqa: B027 - optional hook, no-op by default
        """Make the names of everything written under ``prefix`` durable (e.g. fsync directories).

        Called before a commit marker is written. Default: nothing to do.
        """

    # --- reads -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | None:
        """Return the object's bytes (or a range of them, see :class:`ByteRange`); ``None`` if missing."""

    def get_into(self, key: str, out: memoryview, offset: int = 0) -> bool:
        """Read ``len(out)`` bytes of ``key`` starting at ``offset`` into ``out``.

        Returns False when the key is missing; raises ``EOFError`` when the object is shorter. Backends
        override this to avoid a copy.
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
        """Whether ``key`` is an object."""
        return self.size(key) is not None

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterable[str]:
        """Keys that start with ``prefix`` (a plain string prefix, recursive), in no particular order."""

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Names of the immediate child directories of the directory ``prefix``, sorted.

        ``prefix`` names a directory with or without its trailing '/' (``'step_1'`` and ``'step_1/'`` are the
        same); ``''`` is the root. Only directories that hold at least one object are listed.
        """
        d = dir_prefix(prefix)
        out = set()
        for k in self.list(d):
            rest = k[len(d) :]
            if "/" in rest:
                out.add(rest.split("/", 1)[0])
        return sorted(out)

    # --- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release connections and handles."""

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def as_buffers(data: Buffer | Sequence[Buffer]) -> builtins.list[memoryview]:
    """Normalise ``put``'s argument to a list of flat byte memoryviews.

    One buffer-like object (bytes, bytearray, memoryview, a numpy array, ...) is one buffer; anything else is
    a sequence of them.
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


# --- byte sources --------------------------------------------------------------------------------------
@runtime_checkable
class StreamSource(Protocol):
    """A checkpoint's byte stream that a writer reads range by range (e.g. a committed step on another tier).

    A range returned by :meth:`read` stays valid until the call after the next one: a writer encodes
    partition ``i+1`` while it writes partition ``i``.
    """

    @property
    def total_bytes(self) -> int:
        """Length of the stream in bytes."""
        ...

    def read(self, start: int, end: int) -> memoryview:
        """Stream bytes ``[start, end)``."""
        ...


@runtime_checkable
class RangeSource(Protocol):
    """Where lazy reads get byte ranges of a committed stream (a tier's reader or a host slot)."""

    @property
    def bytes_read(self) -> int:
        """Stored bytes fetched so far (for lazy-read accounting)."""
        ...

    def read_range_into(self, start: int, end: int, out: memoryview) -> None:
        """Read stream bytes ``[start, end)`` into ``out``, verified."""
        ...


# --- retention -----------------------------------------------------------------------------------------
@runtime_checkable
class RetentionPolicy(Protocol):
    """Which of a tier's steps to keep (a tier keeps a step when any of its policies does)."""

    def keep(self, steps: Sequence[int], sizes: Mapping[int, int]) -> set[int]:
        """The steps to keep among ``steps`` (oldest first; ``sizes``: stored bytes per step)."""
        ...

    def wants(self, step: int, age: int) -> bool:
        """Whether a tier with this policy should receive ``step``; ``age`` is its position among the source
        tier's steps counted from the newest (0 = newest)."""
        ...


# --- snapshot copies -----------------------------------------------------------------------------------
@dataclass
class CopyRecord:
    """One copy range of a snapshot as an executor ran it (times from ``time.perf_counter``)."""

    start: int
    end: int
    t_submit: float
    t_begin: float = 0.0
    t_end: float = 0.0
    where: str = ""  # "forward" | "backward" | "step" | "begin"

    @property
    def nbytes(self) -> int:
        """Bytes in the range."""
        return self.end - self.start


class CopyExecutor(abc.ABC):
    """Copies byte ranges of a layout's stream from live tensors into a host slot buffer."""

    @abc.abstractmethod
    def bind(self, buffer: torch.Tensor, layout: Layout, tensors: Mapping[str, torch.Tensor]) -> None:
        """Start a snapshot: copies go from ``tensors`` (laid out by ``layout``) into ``buffer``."""

    @abc.abstractmethod
    def submit(self, start: int, end: int, where: str) -> None:
        """Copy stream bytes ``[start, end)`` in the background; ``where`` names the window, for telemetry."""

    @abc.abstractmethod
    def copy_now(self, start: int, end: int, where: str) -> None:
        """Copy synchronously in the caller (for bytes needed before training may go on)."""

    @abc.abstractmethod
    def drain(self) -> builtins.list[CopyRecord]:
        """Block until every submitted copy is complete (the barrier); returns their records."""

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Stop background threads or streams."""


__all__ = [
    "Buffer",
    "ByteRange",
    "Capabilities",
    "CopyExecutor",
    "CopyRecord",
    "ObjectStore",
    "RangeSource",
    "RetentionPolicy",
    "StreamSource",
    "as_buffers",
    "check_key",
    "check_prefix",
    "dir_prefix",
]
