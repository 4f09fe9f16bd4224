"""Retention and promotion policies for a tier chain (pure: no I/O).

A tier keeps a step when *any* of its policies keeps it. The planners never delete the
only complete copy of the newest step, a delta base that a kept step depends on, or a
step that a lower tier still has to receive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError


class Policy:
    """Which of a tier's steps (oldest first, with stored sizes) to keep."""

    def keep(self, steps: Sequence[int], sizes: Mapping[int, int]) -> set[int]:
        raise NotImplementedError

    def wants(self, step: int, age: int) -> bool:
        """Whether ``step`` should be promoted to a tier with this policy; ``age`` is its position
        among the source tier's steps counted from the newest (0 = newest)."""
        return True


@dataclass(frozen=True)
class LatestN(Policy):
    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"LatestN needs n >= 1, got {self.n}")

    def keep(self, steps: Sequence[int], sizes: Mapping[int, int]) -> set[int]:
        return set(sorted(steps)[-self.n :])

    def wants(self, step: int, age: int) -> bool:
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
        hits = sorted(s for s in steps if s % self.n == 0)
        return set(hits if self.limit is None else hits[-self.limit :])

    def wants(self, step: int, age: int) -> bool:
        return step % self.n == 0


@dataclass(frozen=True)
class ByteBudget(Policy):
    """Keep the newest steps whose stored bytes fit ``max_bytes`` (at least the newest one)."""

    max_bytes: int

    def keep(self, steps: Sequence[int], sizes: Mapping[int, int]) -> set[int]:
        out: set[int] = set()
        used = 0
        for s in sorted(steps, reverse=True):
            used += sizes.get(s, 0)
            if out and used > self.max_bytes:
                break
            out.add(s)
        return out

    def wants(self, step: int, age: int) -> bool:
        return age == 0


@dataclass(frozen=True)
class KeepAll(Policy):
    def keep(self, steps: Sequence[int], sizes: Mapping[int, int]) -> set[int]:
        return set(steps)


def parse_keep(keep: int | Policy | Iterable[Policy] | None) -> tuple[Policy, ...]:
    """``5`` -> LatestN(5); ``None`` -> keep everything; a policy or list of policies as is."""
    if keep is None:
        return (KeepAll(),)
    if isinstance(keep, int):
        return (LatestN(keep),)
    if isinstance(keep, Policy):
        return (keep,)
    pols = tuple(keep)
    if not pols or not all(isinstance(p, Policy) for p in pols):
        raise ConfigError(f"keep must be an int, a Policy or a list of Policies, got {keep!r}")
    return pols


def promotion_wanted(policies: Sequence[Policy], step: int, *, age: int) -> bool:
    """A tier receives a step that one of its policies would keep; ``age`` counts the step's
    position among the source's steps from the newest (0 = newest)."""
    return any(p.wants(step, age) for p in policies)


def plan_deletions(
    steps: Sequence[int], sizes: Mapping[int, int], policies: Sequence[Policy], *, protected: Iterable[int] = ()
) -> list[int]:
    """Steps of this tier to delete: not kept by any policy and not ``protected``."""
    keep: set[int] = set(protected)
    for p in policies:
        keep |= p.keep(steps, sizes)
    return sorted(s for s in steps if s not in keep)
