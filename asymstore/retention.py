"""Retention, promotion and delta decisions for a tier chain (pure: no I/O).

Everything about the life of a step on a tier is decided here, over what the tier manager knows:

* which steps a tier receives (:func:`promotion_wanted`) and keeps (the policies, :func:`plan_deletions`);
* which steps may be deleted now (:func:`plan_retention`): a tier keeps a step when *any* of its policies keeps
  it, and never deletes the only durable copy of the newest step, a step a lower tier still has to receive, or
  a delta base while a kept step depends on it (dependents are deleted before their base);
* whether a step is written as an XOR delta against the tier's base, and which step becomes the next base
  (:func:`delta_decision`, :func:`next_delta_state`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .interfaces import RetentionPolicy


class Policy:
    """A convenient base for retention policies: receives every step; subclasses say what they keep.

    Any object with ``keep`` and ``wants`` (the :class:`~asymstore.interfaces.RetentionPolicy` protocol) is a
    policy; subclassing this one is optional.
    """

    def keep(self, steps: Sequence[int], sizes: Mapping[int, int]) -> set[int]:
        """The steps to keep among ``steps`` (oldest first; ``sizes``: stored bytes per step)."""
        raise NotImplementedError

    def wants(self, step: int, age: int) -> bool:
        """Whether ``step`` should be promoted to a tier with this policy; ``age`` is its position
        among the source tier's steps counted from the newest (0 = newest)."""
        return True


@dataclass(frozen=True)
class LatestN(Policy):
    """Keep (and receive) the newest ``n`` steps."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"LatestN needs n >= 1, got {self.n}")

    def keep(self, steps: Sequence[int], sizes: Mapping[int, int]) -> set[int]:
        """The newest ``n`` of ``steps``."""
        return set(sorted(steps)[-self.n :])

    def wants(self, step: int, age: int) -> bool:
        """Receive a step while it is among the newest ``n``."""
        return age < self.n


@dataclass(frozen=True)
class EveryN(Policy):
    """Keep steps that are multiples of ``n`` (all of them, or the newest ``limit``)."""

    n: int
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"EveryN needs n >= 1, got {self.n}")

    def keep(self, steps: Sequence[int], sizes: Mapping[int, int]) -> set[int]:
        """The multiples of ``n`` among ``steps`` (the newest ``limit`` of them when set)."""
        hits = sorted(s for s in steps if s % self.n == 0)
        return set(hits if self.limit is None else hits[-self.limit :])

    def wants(self, step: int, age: int) -> bool:
        """Receive the multiples of ``n``."""
        return step % self.n == 0


@dataclass(frozen=True)
class ByteBudget(Policy):
    """Keep the newest steps whose stored bytes fit ``max_bytes`` (at least the newest one)."""

    max_bytes: int

    def keep(self, steps: Sequence[int], sizes: Mapping[int, int]) -> set[int]:
        """The newest steps whose sizes add up to at most ``max_bytes`` (always the newest)."""
        out: set[int] = set()
        used = 0
        for s in sorted(steps, reverse=True):
            used += sizes.get(s, 0)
            if out and used > self.max_bytes:
                break
            out.add(s)
        return out

    def wants(self, step: int, age: int) -> bool:
        """Receive only the newest step."""
        return age == 0


@dataclass(frozen=True)
class KeepAll(Policy):
    """Keep every step (the default of a tier without ``keep``)."""

    def keep(self, steps: Sequence[int], sizes: Mapping[int, int]) -> set[int]:
        """All of ``steps``."""
        return set(steps)


def parse_keep(keep: int | RetentionPolicy | Iterable[RetentionPolicy] | None) -> tuple[RetentionPolicy, ...]:
    """``5`` -> LatestN(5); ``None`` -> keep everything; a policy or list of policies as is.

    A policy is any object satisfying :class:`~asymstore.interfaces.RetentionPolicy`.
    """
    if keep is None:
        return (KeepAll(),)
    if isinstance(keep, int) and not isinstance(keep, bool):
        return (LatestN(keep),)
    if isinstance(keep, RetentionPolicy):
        return (keep,)
    try:
        pols = tuple(keep)  # type: ignore[arg-type]
    except TypeError:
        pols = ()
    if not pols or not all(isinstance(p, RetentionPolicy) for p in pols):
        raise ConfigError(f"keep must be an int, a retention policy or a list of them, got {keep!r}")
    return pols


def promotion_wanted(policies: Sequence[RetentionPolicy], step: int, *, age: int) -> bool:
    """A tier receives a step that one of its policies would keep; ``age`` counts the step's
    position among the source's steps from the newest (0 = newest)."""
    return any(p.wants(step, age) for p in policies)


def plan_deletions(
    steps: Sequence[int],
    sizes: Mapping[int, int],
    policies: Sequence[RetentionPolicy],
    *,
    protected: Iterable[int] = (),
) -> list[int]:
    """Steps of this tier to delete: not kept by any policy and not ``protected`` (oldest first)."""
    keep: set[int] = set(protected)
    for p in policies:
        keep |= p.keep(steps, sizes)
    return sorted(s for s in steps if s not in keep)


#: A step's delta base(s) as commit markers record them: ``None`` (a full checkpoint), one step, or several
#: (a multi-rank step whose ranks' deltas have different bases)
DeltaBases = int | None | Collection[int]


def bases_of(value: DeltaBases) -> frozenset[int]:
    """The steps a checkpoint is XOR-encoded against, from a :data:`DeltaBases` value."""
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset((value,))
    return frozenset(int(b) for b in value)


def plan_retention(
    steps: Sequence[int],
    sizes: Mapping[int, int],
    policies: Sequence[RetentionPolicy],
    *,
    delta_bases: Mapping[int, DeltaBases],
    durable_elsewhere: Iterable[int] = (),
    pending: Iterable[int] = (),
    protected: Iterable[int] = (),
) -> list[int]:
    """The steps of a tier to delete now, in the order to delete them (:func:`deletion_order`: every step
    before the steps it is a delta of).

    ``delta_bases``: each step's delta base(s) (``None``: a full checkpoint); ``durable_elsewhere``: steps
    complete on another durable tier; ``pending``: steps a lower tier still has to receive from this one;
    ``protected``: steps to keep whatever the policies say (e.g. the tier's current delta base, which the next
    writes are encoded against). Never deleted: the newest step unless it is durable elsewhere, a pending or
    protected step, the delta base of a step that stays.
    """
    if not steps:
        return []
    keep = set(pending) | set(protected)
    newest = max(steps)
    if newest not in set(durable_elsewhere):
        keep.add(newest)  # never delete the only complete copy of the newest step
    doomed = set(plan_deletions(steps, sizes, policies, protected=keep))
    kept = set(steps) - doomed
    # delta bases of kept steps stay (a base is always a full checkpoint: one level to follow)
    doomed -= {b for s in kept for b in bases_of(delta_bases.get(s))}
    return deletion_order(doomed, delta_bases)


def deletion_order(doomed: Iterable[int], delta_bases: Mapping[int, DeltaBases]) -> list[int]:
    """``doomed`` in an order that deletes every step before each step it is a delta of (dependants first).

    A kill between any two deletions then leaves only steps whose bases are all still there. A delta is
    usually newer than its base, but not always (a lower tier receives promotions newest first and may encode
    an older step against a newer base), so the order follows the recorded bases; among steps free to go, the
    newest goes first. Bases that form a cycle (a damaged marker) are deleted newest first after the rest.
    """
    left = set(doomed)
    # waiting[b]: doomed steps that are deltas of b and not deleted yet
    waiting: dict[int, set[int]] = {s: set() for s in left}
    for s in left:
        for b in bases_of(delta_bases.get(s)):
            if b in waiting and b != s:
                waiting[b].add(s)
    out: list[int] = []
    while left:
        free = [s for s in left if not waiting[s]]
        if not free:  # a cycle: no order is safe; go newest first
            free = [max(left)]
        s = max(free)
        out.append(s)
        left.discard(s)
        for b in bases_of(delta_bases.get(s)):
            if b in waiting:
                waiting[b].discard(s)
    return out


def dependents(step: int, delta_bases: Mapping[int, DeltaBases]) -> list[int]:
    """The steps XOR-encoded against ``step`` (``delta_bases``: each step's base(s)): while any is there,
    deleting ``step`` would make them unreadable."""
    return sorted(s for s, b in delta_bases.items() if step in bases_of(b))


# --- deltas ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeltaState:
    """What a tier remembers about its delta base: the base step, its layout signature, and how many deltas
    were written against it since it was written."""

    base_step: int | None = None
    signature: str | None = None
    since_base: int = 0


@dataclass(frozen=True)
class DeltaDecision:
    """Whether a step may be written as an XOR delta: against ``base_step`` (``None``: full), and why."""

    base_step: int | None
    reason: str


def delta_decision(
    step: int, signature: str, state: DeltaState, *, delta_every: int, whole_stream: bool
) -> DeltaDecision:
    """Whether ``step`` (laid out as ``signature``) may be XOR-encoded against the tier's base.

    A full base is written every ``delta_every`` checkpoints and the ones between are offered the base; a
    stream read range by range (from another tier) is never a delta (the XOR needs the whole stream at hand).
    """
    if delta_every <= 0:
        return DeltaDecision(None, "deltas off")
    if not whole_stream:
        return DeltaDecision(None, "stream read range by range")
    if state.base_step is None:
        return DeltaDecision(None, "no base yet")
    if state.signature != signature:
        return DeltaDecision(None, "layout changed since the base")
    if state.base_step == step:
        return DeltaDecision(None, "step is the base")
    if state.since_base >= delta_every - 1:
        return DeltaDecision(None, f"a full checkpoint every {delta_every}")
    return DeltaDecision(state.base_step, f"delta {state.since_base + 1} of {delta_every - 1}")


def next_delta_state(
    state: DeltaState, step: int, signature: str, *, delta_every: int, used_delta: bool
) -> tuple[DeltaState, bool]:
    """The tier's delta state after writing ``step`` from a whole stream, and whether that stream becomes
    the new base (a step written in full, while deltas are on, is the base of the next ones)."""
    if delta_every <= 0:
        return state, False
    if used_delta:
        return DeltaState(state.base_step, state.signature, state.since_base + 1), False
    return DeltaState(step, signature, 0), True


__all__ = [
    "ByteBudget",
    "DeltaDecision",
    "DeltaState",
    "EveryN",
    "KeepAll",
    "LatestN",
    "Policy",
    "deletion_order",
    "delta_decision",
    "dependents",
    "next_delta_state",
    "parse_keep",
    "plan_deletions",
    "plan_retention",
    "promotion_wanted",
]
