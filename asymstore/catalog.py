"""The catalog: which checkpoints a backend holds, how to open one, and where to read a step from.

Every question "what is stored here" goes through this module, so each is answered one way:

* **Listing.** :func:`committed_steps` (step directories with a commit marker), :func:`partial_steps` (step
  directories without one: interrupted or in-flight saves), and per rank :func:`committed_ranks` (which rank
  directories of a step hold their own marker), :func:`rank_committed` and :func:`rank_leftovers` (the
  objects a rank left in an uncommitted step), with :func:`discard_uncommitted` to remove those.
* **Opening.** :func:`open_reader` is the one reader factory: it opens a committed step (one rank's
  directory of a multi-rank step) and wires the reader of its delta base, for the same rank.
* **The read policy.** :func:`read_sources` lists, for one step, where a complete copy lies, fastest first:
  the host memory slot (when this process holds the step and the rank asked for is its own), then the
  persistent tiers in chain order. :func:`read_first` reads from the first source that works and falls back,
  in that same order, when a copy is damaged (:class:`~asymstore.errors.CorruptCheckpointError`) or gone
  (:class:`~asymstore.errors.StepNotFoundError`: a host slot reused, a tier that lost the step).
  :class:`FallbackSource` applies the same order to lazy reads: a range that fails its checksum on one copy
  is read from the next one.

``Store.restore``, ``Store.open_checkpoint``, ``asymstore.open_checkpoint``, the CLI, the DCP reader and the
cleanup of crashed attempts all use these functions; nothing else lists step directories or opens readers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from . import validate
from .errors import AsymstoreError, CorruptCheckpointError, StepNotFoundError
from .interfaces import ObjectStore, RangeSource
from .manifest import (
    COMMIT_KEY,
    commit_delta_bases,
    parse_commit,
    parse_rank_dir,
    parse_step_dir,
    rank_dir,
    rank_dir_name,
    step_dir,
)
from .reader import CheckpointReader
from .retention import dependents as _dependents

log = logging.getLogger("asymstore")

T = TypeVar("T")

#: the name of the host memory source in :func:`read_sources` (tiers are named by their tier name)
HOST = "host"
#: the source name of a peer rank's replica of this rank's host slot (another node's shared memory)
PEER = "peer"


# --- listing -----------------------------------------------------------------------------------------------
def _step_dirs(backend: ObjectStore) -> list[tuple[int, bool]]:
    """The one scan of step directories: ``(step, committed)`` for each, oldest first."""
    out = []
    for d in backend.list_dirs(""):
        s = parse_step_dir(d.rstrip("/"))
        if s is not None:
            out.append((s, is_committed(backend, s)))
    return sorted(out)


def committed_steps(backend: ObjectStore) -> list[int]:
    """Steps with a commit marker on ``backend``, oldest first."""
    return [s for s, committed in _step_dirs(backend) if committed]


def partial_steps(backend: ObjectStore) -> list[int]:
    """Step directories without a commit marker (interrupted or in-flight saves), oldest first."""
    return [s for s, committed in _step_dirs(backend) if not committed]


def committed_parts(backend: ObjectStore, *, rank: int, world_size: int) -> list[int]:
    """Steps of a multi-rank job of ``world_size`` ranks not committed as a whole whose ``rank`` directory is
    committed (its part is complete, the step waits for other ranks or for rank 0's marker), oldest first. A part
    written by a job of another world size (its marker's ``world_size``), or whose marker does not say, is not
    one: no marker for ``world_size`` ranks may ever count it."""
    if world_size <= 1:
        return []
    out = []
    for s in partial_steps(backend):
        key = f"{rank_dir(s, rank, world_size)}/{COMMIT_KEY}"
        raw = backend.get(key)
        if raw is None:
            continue
        try:
            marker = parse_commit(raw, key, step=s)
        except CorruptCheckpointError as e:
            log.warning("%s: rank %s's part of step %s is not counted: %s", backend.url, rank, s, e)
            continue
        if marker.get("world_size") == world_size:
            out.append(s)
    return out


def is_committed(backend: ObjectStore, step: int) -> bool:
    """Whether ``step`` has its (step-level) commit marker on ``backend``."""
    return backend.exists(f"{step_dir(step)}/{COMMIT_KEY}")


def commit_info(backend: ObjectStore, step: int) -> dict[str, object]:
    """The step's parsed commit marker (``{}`` when not committed); damage raises ``CorruptCheckpointError``."""
    key = f"{step_dir(step)}/{COMMIT_KEY}"
    raw = backend.get(key)
    return {} if raw is None else parse_commit(raw, key, step=step)


def dependents(backend: ObjectStore, step: int) -> list[int]:
    """Committed steps stored as XOR deltas of ``step`` (deleting ``step`` would make them unreadable)."""
    bases: dict[int, list[int]] = {}
    for s in committed_steps(backend):
        try:
            bases[s] = commit_delta_bases(commit_info(backend, s))
        except CorruptCheckpointError:
            continue
    return _dependents(step, bases)


def committed_ranks(backend: ObjectStore, step: int) -> list[int]:
    """Ranks whose rank directory of ``step`` holds that rank's commit marker, sorted."""
    out = []
    for d in backend.list_dirs(step_dir(step)):
        r = parse_rank_dir(d.rstrip("/"))
        if r is not None and backend.exists(f"{step_dir(step)}/{rank_dir_name(r)}/{COMMIT_KEY}"):
            out.append(r)
    return sorted(out)


def rank_committed(backend: ObjectStore, step: int, *, rank: int, world_size: int) -> bool:
    """Whether ``rank``'s part of ``step`` is committed (its rank directory's marker, or the step's for one rank)."""
    return backend.exists(f"{rank_dir(step, rank, world_size)}/{COMMIT_KEY}")


def rank_leftovers(backend: ObjectStore, step: int, *, rank: int, world_size: int) -> int:
    """How many objects ``rank`` holds under ``step`` (its rank directory; the whole step for one rank)."""
    return sum(1 for _ in backend.list(rank_dir(step, rank, world_size) + "/"))


def discard_uncommitted(
    backend: ObjectStore, *, rank: int, world_size: int, after: int | None = None, keep: Collection[int] = ()
) -> list[int]:
    """Remove ``rank``'s objects of every uncommitted step (newer than ``after`` if given, never those in
    ``keep``, e.g. steps this process is persisting); the steps cleaned.

    Only that rank writes them, so this is safe whenever it is not saving, e.g. when a job starts or resumes.
    """
    out = []
    for s in partial_steps(backend):
        if (after is not None and s <= after) or s in keep:
            continue
        if rank_leftovers(backend, s, rank=rank, world_size=world_size):
            n = backend.delete_prefix(rank_dir(s, rank, world_size) + "/")
            log.info("removed %d objects of rank %d of the uncommitted step %d in %s", n, rank, s, backend.url)
            out.append(s)
    return out


# --- opening -----------------------------------------------------------------------------------------------
def _base_factory(
    backend: ObjectStore, step: int, rank: int | None, chain: tuple[int, ...]
) -> Callable[[int], CheckpointReader]:
    """Opens the committed delta bases of ``step`` (``chain``: the steps opened so far), for ``rank``."""

    def factory(s: int) -> CheckpointReader:
        # a delta base names a step that may itself be a delta: refuse a cycle or an unbounded chain
        validate.delta_chain(chain, s, f"{step_dir(step)}/{COMMIT_KEY}")
        return CheckpointReader.open(backend, s, base_reader=_base_factory(backend, step, rank, (*chain, s)), rank=rank)

    return factory


def open_reader(backend: ObjectStore, step: int, *, rank: int | None = None) -> CheckpointReader:
    """Open committed ``step`` on ``backend`` (``rank``'s directory of a multi-rank step, default rank 0).

    A delta step's base is opened on demand through this same factory, for the same rank.
    """
    return _base_factory(backend, step, rank, ())(step)


def open_rank_part(backend: ObjectStore, step: int, *, rank: int, world_size: int) -> CheckpointReader:
    """Open ``rank``'s committed directory of a step whose step marker is missing (:func:`committed_parts`);
    its delta bases are committed steps, opened like :func:`open_reader` does."""
    return CheckpointReader.open_rank_part(
        backend, step, rank, world_size, base_reader=_base_factory(backend, step, rank, (step,))
    )


def read_rank(backend: ObjectStore, step: int, *, rank: int | None, my_rank: int, world_size: int) -> int:
    """Which rank's directory to read: ``rank`` if given; else ours when the step was saved by as many ranks
    as we are, else rank 0's (a replicated or consolidated state read on another world size)."""
    if rank is not None:
        return rank
    ranks = commit_info(backend, step).get("ranks", 1)
    return my_rank if isinstance(ranks, int) and ranks == world_size else 0


# --- the read policy ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One place a complete copy of a step lies: the host memory slot (``backend`` None) or a tier."""

    name: str
    backend: ObjectStore | None = None
    #: the tier holds this rank's committed part of a step whose step marker is missing (read after an agreement)
    part: bool = False

    @property
    def is_host(self) -> bool:
        """Whether this is the host memory slot."""
        return self.name == HOST


@dataclass(frozen=True)
class Failure:
    """A source that could not be read, and why."""

    source: Source
    error: AsymstoreError

    def __str__(self) -> str:
        return f"{self.source.name}: {self.error}"


def read_sources(
    step: int, *, host: bool, tiers: Sequence[tuple[str, ObjectStore]], rank: int | None = None, my_rank: int = 0
) -> list[Source]:
    """Where ``step`` can be read from, in the one read order: fastest complete copy first.

    ``host``: whether this process's host memory holds the step (it holds only ``my_rank``'s part, so it is
    skipped when another ``rank`` is asked for); ``tiers``: ``(name, backend)`` of the persistent tiers in
    chain order. A tier that cannot be asked (unreachable) is left out, with a warning.
    """
    return list(iter_sources(step, host=host, tiers=tiers, rank=rank, my_rank=my_rank))


def iter_sources(
    step: int, *, host: bool, tiers: Sequence[tuple[str, ObjectStore]], rank: int | None = None, my_rank: int = 0
) -> Iterator[Source]:
    """:func:`read_sources` lazily: a tier is asked only when the copies before it did not do (a restore that
    reads the first tier never waits on a slow or frozen lower one)."""
    if host and (rank is None or rank == my_rank):
        yield Source(HOST)
    for name, backend in tiers:
        try:
            committed = is_committed(backend, step)
        except AsymstoreError as e:
            log.warning("tier %s cannot be asked for step %s: %s", name, step, e)
            continue
        if committed:
            yield Source(name, backend)


@dataclass
class ReadOutcome(Generic[T]):
    """What :func:`read_first` read, from where, and the sources it fell back from."""

    value: T
    source: Source
    failures: list[Failure] = field(default_factory=list)


def try_in_order(sources: Iterable[Source], read: Callable[[Source], T]) -> tuple[ReadOutcome[T] | None, list[Failure]]:
    """Call ``read`` on each source in order until one succeeds; damaged or vanished copies are skipped.

    Returns the outcome (``None`` when no source worked) and every failure, in order. Errors other than
    ``CorruptCheckpointError`` and ``StepNotFoundError`` propagate.
    """
    failures: list[Failure] = []
    for src in sources:
        try:
            value = read(src)
        except (CorruptCheckpointError, StepNotFoundError) as e:
            failures.append(Failure(src, e))
            log.warning("read from %s failed (%s); trying the next source", src.name, e)
            continue
        return ReadOutcome(value, src, failures), failures
    return None, failures


def read_first(sources: Sequence[Source], read: Callable[[Source], T], *, what: str) -> ReadOutcome[T]:
    """:func:`try_in_order`, raising when no source works: ``CorruptCheckpointError`` (naming the damaged
    objects) when a copy was damaged, else ``StepNotFoundError``. ``what`` names the step in messages."""
    outcome, failures = try_in_order(sources, read)
    if outcome is not None:
        return outcome
    raise no_readable_copy(what, failures)


def no_readable_copy(what: str, failures: Sequence[Failure]) -> AsymstoreError:
    """The error for "no source of ``what`` could be read" after ``failures``."""
    if not failures:
        return StepNotFoundError(f"{what} is not complete on any tier")
    damaged: list[str] = []
    for f in failures:
        if isinstance(f.error, CorruptCheckpointError):
            damaged += [o for o in f.error.objects if o not in damaged]
    msg = f"no readable copy of {what}: " + "; ".join(map(str, failures))
    if any(isinstance(f.error, CorruptCheckpointError) for f in failures):
        return CorruptCheckpointError(msg, tuple(damaged))
    return StepNotFoundError(msg)


class FallbackSource(RangeSource):
    """A :class:`~asymstore.interfaces.RangeSource` over the copies of one step, in read order.

    Reads go to the current copy; when a range fails its checksum there, or the copy is gone (a host slot
    reused), the next copy is opened and the range read from it. ``fallbacks`` open the later copies.
    """

    def __init__(self, first: RangeSource, fallbacks: Sequence[tuple[str, Callable[[], RangeSource]]] = ()) -> None:
        self.current = first
        self._fallbacks = list(fallbacks)
        self._done_bytes = 0  # bytes read by copies given up on

    @property
    def bytes_read(self) -> int:
        """Stored bytes fetched so far, over every copy used."""
        return self._done_bytes + self.current.bytes_read

    def read_range_into(self, start: int, end: int, out: memoryview) -> None:
        """Read stream bytes ``[start, end)`` into ``out`` from the first copy that has them intact."""
        while True:
            try:
                self.current.read_range_into(start, end, out)
                return
            except (CorruptCheckpointError, StepNotFoundError) as e:
                if not self._fallbacks:
                    raise
                self._next(e)

    def _next(self, error: AsymstoreError) -> None:
        last: AsymstoreError = error
        while self._fallbacks:
            name, opener = self._fallbacks.pop(0)
            log.warning("lazy read: %s; reading from %s", last, name)
            try:
                nxt = opener()
            except (CorruptCheckpointError, StepNotFoundError) as e:
                last = e
                continue
            self._done_bytes += self.current.bytes_read
            self.current = nxt
            return
        raise last


__all__ = [
    "HOST",
    "Failure",
    "FallbackSource",
    "ReadOutcome",
    "Source",
    "commit_info",
    "committed_parts",
    "committed_ranks",
    "committed_steps",
    "dependents",
    "discard_uncommitted",
    "is_committed",
    "no_readable_copy",
    "open_rank_part",
    "open_reader",
    "partial_steps",
    "rank_committed",
    "rank_leftovers",
    "read_first",
    "read_rank",
    "read_sources",
    "try_in_order",
]
