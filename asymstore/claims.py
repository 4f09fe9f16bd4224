"""Exclusive claims: who is writing a step (or a probe) directory, and whether that writer can still be alive.

Before a writer puts the first object of a step's (rank) directory it creates the directory's ``CLAIM`` object
with :meth:`~asymstore.interfaces.ObjectStore.create_exclusive`: of two processes saving the same step into one
root, exactly one creates it; the other gets :class:`~asymstore.errors.StepExistsError` and touches nothing. Once
the step's commit marker is written the claim is removed (the marker refuses later writers; a writer that wins
a claim checks for the marker again before it writes).

A claim records its writer (host, boot id, pid and the pid's start time) so that the leftovers of a crashed save
can be told from a save in progress:

* on the same machine (same boot id) a claim is *dead* when its process is gone (or the pid was reused: another
  start time), or when it is this process's own and no writer of this process holds it any more;
* a claim made on another machine cannot be checked; it counts as dead only once it is older than
  ``stale_after_s`` (:data:`FOREIGN_STALE_S` by default).

Crash leftovers are removed only when their claim is dead (:func:`is_dead`), so cleaning a store never removes
what a live writer is writing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

#: the claim object of a step (rank) directory or probe directory
CLAIM_KEY = "CLAIM"
#: a claim made on another machine counts as dead after this many seconds (its process cannot be checked)
FOREIGN_STALE_S = 6 * 3600.0

_ACTIVE: set[str] = set()  # tokens of the claims this process's writers hold now
_ACTIVE_LOCK = threading.Lock()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (``''`` when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


_BOOT = _boot_id()
_HOST = socket.gethostname()


@dataclass(frozen=True)
class Claim:
    """A parsed claim record: whose writer created it, and when."""

    token: str
    host: str
    boot: str
    pid: int
    start: str
    time: float
    what: str

    def describe(self) -> str:
        """Who holds it, in words (for error messages)."""
        age = max(time.time() - self.time, 0.0)
        return f"process {self.pid} on {self.host} (claimed {age:.0f} s ago)"


def new_claim(what: str) -> tuple[str, bytes]:
    """A fresh claim record for this process: ``(token, bytes)``; the token counts as held until released."""
    token = uuid.uuid4().hex
    pid = os.getpid()
    body = {
        "token": token,
        "host": _HOST,
        "boot": _BOOT,
        "pid": pid,
        "start": _start_time(pid),
        "time": time.time(),
        "what": what,
    }
    hold(token)
    return token, json.dumps(body, separators=(",", ":")).encode()


def hold(token: str) -> None:
    """Mark ``token`` as held by a writer of this process."""
    with _ACTIVE_LOCK:
        _ACTIVE.add(token)


def release(token: str) -> None:
    """This process no longer writes under ``token`` (its save finished, failed or gave up)."""
    with _ACTIVE_LOCK:
        _ACTIVE.discard(token)


def parse(raw: bytes | None) -> Claim | None:
    """The claim of a stored record; ``None`` when it is missing or unreadable."""
    if raw is None:
        return None
    try:
        d: Any = json.loads(raw)
        return Claim(
            str(d["token"]),
            str(d["host"]),
            str(d["boot"]),
            int(d["pid"]),
            str(d["start"]),
            float(d["time"]),
            str(d.get("what", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not start or _start_time(pid) in ("", start)


def is_dead(claim: Claim | None, *, stale_after_s: float = FOREIGN_STALE_S, now: float | None = None) -> bool:
    """Whether no live writer can hold ``claim`` (``None``, an unreadable record, counts as dead).

    Same machine: its process is gone, or it is this process's own and no writer here holds it. Another
    machine: older than ``stale_after_s``.
    """
    if claim is None:
        return True
    if claim.boot and claim.boot == _BOOT and claim.host == _HOST:
        if claim.pid == os.getpid():
            with _ACTIVE_LOCK:
                return claim.token not in _ACTIVE
        return not _alive(claim.pid, claim.start)
    t = time.time() if now is None else now
    return t - claim.time > stale_after_s


def is_own_abandoned(claim: Claim | None) -> bool:
    """Whether ``claim`` was made by this process and no writer of this process holds it (a failed save's)."""
    if claim is None or claim.pid != os.getpid() or claim.boot != _BOOT or claim.host != _HOST:
        return False
    with _ACTIVE_LOCK:
        return claim.token not in _ACTIVE


__all__ = [
    "CLAIM_KEY",
    "FOREIGN_STALE_S",
    "Claim",
    "hold",
    "is_dead",
    "is_own_abandoned",
    "new_claim",
    "parse",
    "release",
]
