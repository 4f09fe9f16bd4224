"""Removing crash leftovers from a tier: what a killed save, delete or probe left behind.

Run when a store opens (:meth:`asymstore.tiermanager.TierManager` cleans each tier once) and by
``discard_uncommitted``. What counts as a leftover:

* a probe directory ``_probe/<id>/`` whose claim (:mod:`.claims`) is dead;
* this rank's part of an uncommitted step (no commit marker) whose claim is dead, or that holds no claim at
  all (every writer claims first, so nobody is writing it: a delete or clean-up that was interrupted). A rank
  directory of a multi-rank step that holds its own marker is complete and waits for rank 0's global marker:
  it is removed only once a newer step is committed (or by ``discard_uncommitted``);
* temporaries of atomic writes (``COMMIT.tmp-*`` and the like) and a claim left in committed step directories
  (nobody writes into a committed step) and, unchanged for :data:`ROOT_TEMP_AGE_S`, temporaries in the root.

A claim of a live writer is never removed: on this machine its process is checked; a claim made on another
machine counts as dead only once older than :data:`asymstore.claims.FOREIGN_STALE_S` (``discard_uncommitted``,
whose caller states that no other writer of its rank runs, removes such claims at once). Within a leftover,
objects are removed first and the claim last, so a second cleaner or writer never sees an unclaimed
directory that still holds data of the crashed attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field

from . import claims
from .interfaces import ObjectStore
from .manifest import COMMIT_KEY, parse_step_dir, rank_dir, step_dir

log = logging.getLogger("asymstore")

#: the directory probes write their measurement objects under
PROBE_DIR = "_probe"
#: a temporary in the root unchanged for this long is a killed writer's (a live one keeps writing it)
ROOT_TEMP_AGE_S = 600.0


@dataclass
class CleanReport:
    """What one clean-up removed: probe directories, steps (this rank's part) and temporaries."""

    probes: int = 0
    steps: list[int] = field(default_factory=list)
    temporaries: int = 0
    claims: int = 0  # claims left in committed steps (a kill right after the marker)
    kept_live: list[int] = field(default_factory=list)  # uncommitted steps a live writer holds

    def __bool__(self) -> bool:
        return bool(self.probes or self.steps or self.temporaries or self.claims)


def _claim_at(backend: ObjectStore, prefix: str) -> tuple[bool, claims.Claim | None]:
    """Whether ``prefix`` holds a claim object, and the claim (``None`` when absent or unreadable)."""
    raw = backend.get(prefix + claims.CLAIM_KEY)
    return raw is not None, claims.parse(raw)


def remove_claimed(backend: ObjectStore, prefix: str, claim: claims.Claim | None) -> int:
    """Remove everything under the directory ``prefix``: the objects, then the claim if it is still ``claim``.

    Returns the objects removed. The directory itself goes once nothing is left in it.
    """
    key = prefix + claims.CLAIM_KEY
    n = 0
    backend.delete(prefix + COMMIT_KEY)  # a rank's own marker first: never a half-removed committed part
    for k in list(backend.list(prefix)):
        if k != key:
            backend.delete(k)
            n += 1
    backend.remove_temporaries(prefix)
    _, now = _claim_at(backend, prefix)
    if now is None or claim is None or now.token == claim.token:
        backend.delete(key)
        n += 1
        if not any(True for _ in backend.list(prefix)):
            backend.delete_prefix(prefix)  # the empty directories
    return n


def clean_leftovers(
    backend: ObjectStore,
    *,
    rank: int = 0,
    world_size: int = 1,
    force: bool = False,
    after: int | None = None,
    keep: Collection[int] = (),
) -> CleanReport:
    """Remove the crash leftovers of ``rank`` on ``backend`` (see the module docstring); what was removed.

    ``force`` (``discard_uncommitted``): claims from other machines count as dead at once, and complete rank
    directories of uncommitted multi-rank steps go too. ``after``: only uncommitted steps newer than it;
    ``keep``: steps never touched (e.g. being persisted from host memory).
    """
    rep = CleanReport()
    stale_after = 0.0 if force else claims.FOREIGN_STALE_S
    # probes
    for d in backend.list_dirs(PROBE_DIR):
        prefix = f"{PROBE_DIR}/{d}/"
        _, claim = _claim_at(backend, prefix)
        if claims.is_dead(claim, stale_after_s=stale_after):
            remove_claimed(backend, prefix, claim)
            rep.probes += 1
    # steps
    listed: list[tuple[int, bool]] = []
    for d in backend.list_dirs(""):
        s = parse_step_dir(d)
        if s is not None:
            listed.append((s, backend.exists(f"{d}/{COMMIT_KEY}")))
    committed = [s for s, c in listed if c]
    newest = max(committed) if committed else None
    for s, is_committed in sorted(listed):
        prefix = rank_dir(s, rank, world_size) + "/"
        if is_committed:  # nobody writes into a committed step: its temporaries and a claim are leftovers
            for p in {step_dir(s) + "/", prefix}:
                rep.temporaries += backend.remove_temporaries(p)
                if backend.exists(p + claims.CLAIM_KEY):
                    backend.delete(p + claims.CLAIM_KEY)
                    rep.claims += 1
            continue
        if (after is not None and s <= after) or s in keep:
            continue
        if not any(True for _ in backend.list(prefix)):
            continue
        has_claim, claim = _claim_at(backend, prefix)
        if has_claim and not claims.is_dead(claim, stale_after_s=stale_after):
            rep.kept_live.append(s)
            continue
        rank_done = world_size > 1 and backend.exists(prefix + COMMIT_KEY)
        if rank_done and not force and (newest is None or s > newest):
            continue  # complete, waiting for rank 0's marker
        n = remove_claimed(backend, prefix, claim)
        log.info("removed %d objects of the uncommitted step %d (rank %d) in %s", n, s, rank, backend.url)
        rep.steps.append(s)
    rep.temporaries += backend.remove_temporaries("", older_than_s=ROOT_TEMP_AGE_S)
    return rep


__all__ = ["PROBE_DIR", "ROOT_TEMP_AGE_S", "CleanReport", "clean_leftovers", "remove_claimed"]
