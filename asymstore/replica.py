"""Peer replicas: each rank's committed host slot is also copied into the shared memory of a peer rank on
another node, so that the rank replacing a lost node restores its part from the peer's memory instead of from a
remote tier (docs/format.md section 13.4).

Transport: plain TCP between the ranks' replica services, one connection per transfer. Not a
``torch.distributed`` collective: a push is one-sided and asynchronous (no rank waits for a peer's schedule, a
skipped or failed checkpoint on one rank cannot deadlock another), it never shares a process group or stream
with training's own collectives, and it is throttled to ``replica_bandwidth`` bytes/s. The addresses and node
names of the ranks are exchanged once through a key-value rendezvous: the ``torch.distributed`` default store
of the process group (or any object with ``set``/``get``).

Placement: a ring by node: the peer of rank r is the first rank after r (cyclically) whose node differs from
r's. A replica is kept in the holder's region ``replica-rNNNNN`` with the same crash-consistent records as an
own slot (two slots: the newest complete replica stays while the next one arrives), verified against the
sender's crc32c on arrival and again when it is read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .errors import AsymstoreError, CorruptCheckpointError, StepNotFoundError
from .shm import ShmRegion, SlotRecord, chunk_crcs, verify_into

log = logging.getLogger("asymstore")

_LEN = struct.Struct("<Q")
#: bytes sent between two throttle checks
_PIECE = 4 << 20


class Rendezvous(Protocol):
    """The key-value store the ranks exchange their replica addresses through (a ``torch.distributed.Store``)."""

    def set(self, key: str, value: str) -> None: ...  # noqa: D102

    def get(self, key: str) -> bytes: ...  # noqa: D102


def default_rendezvous() -> Rendezvous:
    """The default process group's store; :class:`AsymstoreError` when no process group is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise AsymstoreError(
            "peer_replicas=1 needs the ranks to find each other: initialise torch.distributed first "
            "(its store is used), or pass replica_rendezvous= an object with set/get"
        )
    return dist.distributed_c10d._get_default_store()


@dataclass(frozen=True)
class Peer:
    """Where a rank's replica service listens, and its node."""

    rank: int
    host: str
    port: int
    node: str


def ring_peer(rank: int, nodes: list[str]) -> int | None:
    """The rank holding ``rank``'s replicas (``nodes[r]``: rank r's node): on the next node of the ring (nodes
    in order of their first rank), the rank with the same local index there (modulo that node's ranks), so
    every rank holds about one peer's replicas. ``None`` when all ranks share one node."""
    order: list[str] = []
    members: dict[str, list[int]] = {}
    for r, node in enumerate(nodes):
        if node not in members:
            order.append(node)
            members[node] = []
        members[node].append(r)
    if len(order) < 2:
        return None
    mine = nodes[rank]
    nxt = members[order[(order.index(mine) + 1) % len(order)]]
    return nxt[members[mine].index(rank) % len(nxt)]


def replica_of(holder: int, nodes: list[str]) -> list[int]:
    """The ranks whose replicas ``holder`` keeps."""
    return [r for r in range(len(nodes)) if ring_peer(r, nodes) == holder]


# --- wire ------------------------------------------------------------------------------------------------------
def _send_msg(sock: socket.socket, head: dict[str, Any]) -> None:
    raw = json.dumps(head).encode()
    sock.sendall(_LEN.pack(len(raw)) + raw)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def _recv_msg(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > 64 << 20:
        raise ConnectionError(f"message header of {n} bytes")
    head = json.loads(_recv_exact(sock, n))
    if not isinstance(head, dict):
        raise ConnectionError("malformed message")
    return head


def _send_throttled(sock: socket.socket, view: memoryview, bandwidth: float) -> None:
    t0 = time.perf_counter()
    for i in range(0, len(view), _PIECE):
        sock.sendall(view[i : i + _PIECE])
        if bandwidth > 0:
            ahead = (i + _PIECE) / bandwidth - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)


# --- the service -------------------------------------------------------------------------------------------------
class ReplicaService:
    """This rank's side of peer replication: a server keeping the replicas of the ranks it holds for, a
    background sender pushing this rank's sealed slots to its peer, and fetches of this rank's replicas."""

    def __init__(
        self,
        *,
        job: str,
        rank: int,
        world_size: int,
        shm_dir: str,
        node: str,
        rendezvous: Rendezvous,
        host: str = "",
        bandwidth: float = 1e9,
        timeout_s: float = 60.0,
    ) -> None:
        self.job, self.rank, self.world_size = job, rank, world_size
        self.shm_dir, self.node, self.bandwidth, self.timeout_s = shm_dir, node, bandwidth, timeout_s
        self.rendezvous = rendezvous
        self._regions: dict[int, ShmRegion] = {}  # source rank -> its replica region here
        self._held: dict[int, dict[int, tuple[SlotRecord, torch.Tensor]]] = {}  # source -> slot -> replica
        self._lock = threading.Lock()
        self._regions_lock = threading.Lock()
        self._closed = threading.Event()
        self.pushed = 0
        self.push_failures = 0
        self.received = 0
        #: pushes not started yet: (run, give up); a newer snapshot replaces them (only the newest matters)
        self._queue: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self._queue_cv = threading.Condition()
        self._in_flight = 0
        listen_host = host or _advertised_host()
        self._server = socket.create_server((listen_host, 0))
        self._server.settimeout(0.5)
        port = self._server.getsockname()[1]
        self._accepting = threading.Thread(target=self._serve, name="asymstore-replica-server", daemon=True)
        self._sending = threading.Thread(target=self._send_loop, name="asymstore-replica-send", daemon=True)
        self._sending.start()
        self._key = f"asymstore/{job}"
        rendezvous.set(f"{self._key}/peer/{rank}", json.dumps({"host": listen_host, "port": port, "node": node}))
        self.peers = [self._peer(r) for r in range(world_size)]
        nodes = [p.node for p in self.peers]
        self.peer_rank = ring_peer(rank, nodes)
        if self.peer_rank is None:
            log.warning("peer_replicas=1 but every rank is on node %r: no replica leaves this node", node)
        for src in replica_of(rank, nodes):
            self._adopt(src)
        self._accepting.start()  # pushes that came meanwhile wait in the listen queue, behind the adoption
        rendezvous.set(f"{self._key}/ready/{rank}", "1")

    def _peer(self, r: int) -> Peer:
        d = json.loads(self.rendezvous.get(f"{self._key}/peer/{r}"))
        return Peer(r, str(d["host"]), int(d["port"]), str(d["node"]))

    # --- holding replicas ---------------------------------------------------------------------------------------
    def _region(self, src: int) -> ShmRegion:
        """The region holding ``src``'s replicas here, opened once (a push may arrive while the service still
        adopts what an earlier process kept)."""
        with self._regions_lock:
            reg = self._regions.get(src)
            if reg is None:
                reg = ShmRegion(self.shm_dir, self.job, src, world_size=self.world_size, replica=True)
                self._regions[src] = reg
                with self._lock:
                    self._held.setdefault(src, {})
            return reg

    def _adopt(self, src: int) -> None:
        """Replicas this node kept for ``src`` before a restart."""
        reg = self._region(src)
        with self._lock:
            for rec, buf in reg.adopt():
                self._held[src][rec.slot] = (rec, buf)
        if self._held[src]:
            log.info("holding replicas of rank %s: steps %s", src, self.held_steps(src))
            self._publish(src)

    def _publish(self, src: int) -> None:
        self.rendezvous.set(f"{self._key}/held/{src}", json.dumps({"holder": self.rank, "steps": self.held_steps(src)}))

    def held_steps(self, src: int) -> list[int]:
        """Steps of rank ``src`` held here, oldest first."""
        with self._lock:
            return sorted(rec.step for rec, _ in self._held.get(src, {}).values())

    def _receive(self, sock: socket.socket, head: dict[str, Any]) -> None:
        src = int(head["src"])
        rec = SlotRecord.from_bytes(head["record"].encode())
        reg = self._region(src)
        with self._lock:
            held = self._held[src]
            newest = max(held, key=lambda i: held[i][0].step) if held else None
            index = 1 if newest == 0 else 0  # the newest complete replica stays until this one is whole
            held.pop(index, None)
        n = max(rec.total_bytes, 1)
        buf = reg.allocate(index, n)
        _recv_into(sock, buf.numpy().data.cast("B")[: rec.total_bytes])
        if chunk_crcs(buf.numpy().data.cast("B")[: rec.total_bytes], rec.chunk_bytes) != rec.crcs:
            raise CorruptCheckpointError(f"the replica of rank {src} step {rec.step} arrived damaged")
        rec = reg.commit_record(
            SlotRecord(index, "", rec.step, rec.pid, rec.created, rec.chunk_bytes, rec.crcs, rec.content)
        )
        with self._lock:
            self._held[src][index] = (rec, buf)
        self.received += 1
        self._publish(src)
        _send_msg(sock, {"ok": True})

    def forget_newer(self, step: int) -> list[tuple[int, int]]:
        """Drop the replicas held here of steps newer than ``step`` (the job resumes from ``step``: they belong
        to the run it abandons, and the resumed run writes those steps again); ``(source rank, step)`` of each."""
        dropped = []
        with self._lock:
            for src, held in self._held.items():
                for index, (rec, _) in list(held.items()):
                    if rec.step > step:
                        self._regions[src].invalidate(index)
                        del held[index]
                        dropped.append((src, rec.step))
        for src in sorted({src for src, _ in dropped}):
            self._publish(src)
        return dropped

    def _serve_fetch(self, sock: socket.socket, head: dict[str, Any]) -> None:
        src, step = int(head["src"]), int(head["step"])
        with self._lock:
            found = [(r, b) for r, b in self._held.get(src, {}).values() if r.step == step]
        if not found:
            _send_msg(sock, {"ok": False, "why": f"no replica of rank {src} step {step} here"})
            return
        rec, buf = found[0]
        _send_msg(sock, {"ok": True, "record": rec.to_bytes().decode()})
        sock.sendall(buf.numpy().data.cast("B")[: rec.total_bytes])

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="asymstore-replica-conn", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.timeout_s)
            try:
                head = _recv_msg(conn)
                if head.get("op") == "push":
                    self._receive(conn, head)
                elif head.get("op") == "fetch":
                    self._serve_fetch(conn, head)
                else:
                    _send_msg(conn, {"ok": False, "why": f"unknown op {head.get('op')!r}"})
            except (OSError, ValueError, KeyError, AsymstoreError) as e:
                log.warning("replica service of rank %s: a request failed: %s", self.rank, e)

    # --- sending ------------------------------------------------------------------------------------------------
    def push(self, record: SlotRecord, stream: memoryview, done: Callable[[], None]) -> None:
        """Queue a copy of this rank's sealed slot (``record``, ``stream``) to the peer; ``done()`` is called when
        the stream is no longer read (the slot may be reused)."""
        if self.peer_rank is None:
            done()
            return
        with self._queue_cv:
            stale, self._queue = self._queue, [(lambda: self._push_now(record, stream, done), done)]
            self._queue_cv.notify_all()
        for _, give_up in stale:  # superseded before they started
            give_up()

    def _push_now(self, record: SlotRecord, stream: memoryview, done: Callable[[], None]) -> None:
        assert self.peer_rank is not None
        peer = self.peers[self.peer_rank]
        try:
            with socket.create_connection((peer.host, peer.port), timeout=self.timeout_s) as sock:
                _send_msg(sock, {"op": "push", "src": self.rank, "record": record.to_bytes().decode()})
                _send_throttled(sock, stream[: record.total_bytes], self.bandwidth)
                reply = _recv_msg(sock)
            if not reply.get("ok"):
                raise ConnectionError(str(reply.get("why")))
            self.pushed += 1
        except (OSError, ValueError) as e:
            self.push_failures += 1
            log.warning("replica of step %s to rank %s failed: %s", record.step, peer.rank, e)
        finally:
            done()

    def _send_loop(self) -> None:
        from .threads import lower_thread_priority

        lower_thread_priority(0, True)
        while True:
            with self._queue_cv:
                while not self._queue and not self._closed.is_set():
                    self._queue_cv.wait(0.5)
                if not self._queue:
                    return
                job, _ = self._queue.pop(0)
                self._in_flight += 1
            try:
                job()
            finally:
                with self._queue_cv:
                    self._in_flight -= 1
                    self._queue_cv.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued push was sent (or failed); False at ``timeout``."""
        with self._queue_cv:
            return self._queue_cv.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    # --- restoring ------------------------------------------------------------------------------------------------
    def remote_steps(self, wait_s: float = 30.0) -> tuple[int | None, list[int]]:
        """Which rank holds replicas of this rank, and of which steps (waits for every rank's service to be up)."""
        for r in range(self.world_size):
            self._wait_key(f"{self._key}/ready/{r}", wait_s)
        holder = ring_peer(self.rank, [p.node for p in self.peers])
        try:
            d = json.loads(self._get_nowait(f"{self._key}/held/{self.rank}"))
        except KeyError:
            return holder, []
        return int(d["holder"]), [int(s) for s in d["steps"]]

    def fetch(self, step: int, holder: int) -> tuple[torch.Tensor, SlotRecord]:
        """This rank's replica of ``step`` from ``holder``, verified."""
        peer = self.peers[holder]
        with socket.create_connection((peer.host, peer.port), timeout=self.timeout_s) as sock:
            _send_msg(sock, {"op": "fetch", "src": self.rank, "step": step})
            head = _recv_msg(sock)
            if not head.get("ok"):
                raise StepNotFoundError(str(head.get("why")))
            rec = SlotRecord.from_bytes(head["record"].encode())
            raw = torch.empty(max(rec.total_bytes, 1), dtype=torch.uint8)
            _recv_into(sock, raw.numpy().data.cast("B")[: rec.total_bytes])
        verify_into(raw, rec, where=f"replica of rank {self.rank} held by rank {holder}")
        return raw, rec

    def _wait_key(self, key: str, wait_s: float) -> None:
        t_end = time.monotonic() + wait_s
        while True:
            try:
                self._get_nowait(key)
                return
            except KeyError:
                if time.monotonic() > t_end:
                    raise AsymstoreError(f"rank of {key} did not start its replica service within {wait_s} s") from None
                time.sleep(0.05)

    def _get_nowait(self, key: str) -> bytes:
        check = getattr(self.rendezvous, "check", None)
        if check is not None and not check([key]):
            raise KeyError(key)
        return self.rendezvous.get(key)

    def close(self, *, remove: bool) -> None:
        """Stop the service; keep (or remove) the replicas held here."""
        self._closed.set()
        with self._queue_cv:
            self._queue_cv.notify_all()
        self._sending.join(timeout=self.timeout_s)
        with contextlib.suppress(OSError):
            self._server.close()
        for reg in self._regions.values():
            reg.close(remove=remove)


def _advertised_host() -> str:
    """The address peers reach this rank at: ``ASYMSTORE_REPLICA_HOST``, else this host's name's address."""
    env = os.environ.get("ASYMSTORE_REPLICA_HOST")
    if env:
        return env
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
