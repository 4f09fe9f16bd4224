"""Host snapshot slots in shared memory that outlive the training process (docs/format.md section 13).

A *region* is one directory per job and rank, by default ``/dev/shm/asymstore/<job>/rNNNNN/``::

    lock                 flock()ed by the live owner; holds its pid
    region.json          format, version, job, rank, world size, tier URL, creation time
    slot-<i>.<gen>.bin   slot i's bytes (one tmpfs file, reserved with fallocate, mapped MAP_SHARED)
    slot-<i>.json        slot i's commit record: step, stream length, crc32c of every chunk, content, pid

Only the process dies in a crash, not the kernel: every byte written into a mapping is in the file. The
protocol is therefore about ordering alone. Before slot ``i`` is reused its record is unlinked; the record is
written (temporary name + rename) only once the slot's bytes are complete and its checksums computed. A slot
is *committed* exactly when a record that parses, whose own crc32c is right and whose data file exists, names
it; a slot that was being written when the process died has no record and is never used.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import mmap
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import AsymstoreError, ConfigError, CorruptCheckpointError
from .files import atomic_file
from .layout import Layout, TensorEntry
from .manifest import rank_dir_name
from .write_plan import CheckpointContent
from .zarrfmt import crc32c

log = logging.getLogger("asymstore")

SHM_FORMAT = "asymstore-shm"
SHM_VERSION = 1
#: the directory under ``shm_dir`` that holds every job's regions
SHM_SUBDIR = "asymstore"
REGION_FILE = "region.json"
LOCK_FILE = "lock"
#: bytes covered by one crc32c of a slot (the unit of verification)
VERIFY_CHUNK = 1 << 20

_DATA_RE = re.compile(r"^slot-(\d+)\.(\d+)\.bin$")
_RECORD_RE = re.compile(r"^slot-(\d+)\.json$")


class ShmError(AsymstoreError):
    """A shared-memory region cannot be used; the message says what to do."""


class ShmRegionBusyError(ShmError):
    """Another live process owns the region (a second store of the same job and rank)."""


class ShmSpaceError(ShmError):
    """The shared-memory file system has no room for a host snapshot slot."""


class ShmFormatError(ShmError):
    """The region was written by another format version of asymstore."""


def default_job(url: str) -> str:
    """The job id derived from the first durable tier's URL: its last path component and a digest of it."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40].strip("._") or "store"
    return f"{base}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def check_job(job: str) -> str:
    """``job`` if it is a plain directory name (letters, digits, ``._-``), else :class:`ConfigError`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", job):
        raise ConfigError(
            f"shm_job must be 1-128 letters, digits, '.', '_' or '-' (not starting with one), got {job!r}"
        )
    return job


def regions_root(shm_dir: str) -> str:
    """The directory holding every job's regions under ``shm_dir``."""
    return os.path.join(shm_dir, SHM_SUBDIR)


def region_path(shm_dir: str, job: str, rank: int, *, replica: bool = False) -> str:
    """The directory of ``job``'s region for ``rank`` (``replica``: the copies of ``rank``'s slots that this
    node holds for it, see :mod:`asymstore.replica`)."""
    name = ("replica-" if replica else "") + rank_dir_name(rank)
    return os.path.join(regions_root(shm_dir), check_job(job), name)


# --- commit records ------------------------------------------------------------------------------------------
def layout_to_json(layout: Layout) -> dict[str, Any]:
    """A layout as JSON (the same members as a manifest's ``layout``)."""
    return {
        "align": layout.align,
        "total_bytes": layout.total_bytes,
        "tensors": [[t.name, t.dtype, list(t.shape), t.offset, t.nbytes] for t in layout.tensors],
    }


def layout_from_json(d: Any) -> Layout:
    """The layout of :func:`layout_to_json`; raises ``ValueError``/``TypeError``/``KeyError`` when malformed."""
    tensors = tuple(
        TensorEntry(str(n), str(dt), tuple(int(x) for x in s), int(o), int(nb)) for n, dt, s, o, nb in d["tensors"]
    )
    layout = Layout(tensors, int(d["total_bytes"]), int(d["align"]))
    for t in layout.tensors:
        if t.offset < 0 or t.nbytes < 0 or t.end > layout.total_bytes:
            raise ValueError(f"tensor {t.name!r} lies outside the stream")
    return layout


@dataclass(frozen=True)
class SlotRecord:
    """A committed slot: which step it holds, who wrote it, the checksums of its stream and its content."""

    slot: int
    data: str  # the data file's name in the region
    step: int
    pid: int
    created: float
    chunk_bytes: int
    crcs: tuple[int, ...]
    content: CheckpointContent
    #: the step reached the first persistent tier (a later absence there means retention deleted it)
    durable: bool = False

    @property
    def total_bytes(self) -> int:
        """Bytes of the checkpoint's stream."""
        return self.content.layout.total_bytes

    def to_bytes(self) -> bytes:
        """The record as stored: JSON with its own crc32c."""
        c = self.content
        body = {
            "format": SHM_FORMAT,
            "version": SHM_VERSION,
            "slot": self.slot,
            "data": self.data,
            "step": self.step,
            "pid": self.pid,
            "created": self.created,
            "chunk_bytes": self.chunk_bytes,
            "crc32c_chunks": list(self.crcs),
            "durable": self.durable,
            "layout": layout_to_json(c.layout),
            "skeleton": c.skeleton,
            "numpy_names": list(c.numpy_names),
            "user": dict(c.user),
        }
        if c.global_parts:  # docs/format.md section 8.2
            from .globalmeta import parts_to_json

            body["global_parts"] = parts_to_json(c.global_parts)
        body["crc32c"] = crc32c(json.dumps(body).encode())
        return json.dumps(body).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SlotRecord:
        """Parse and check a stored record; ``ValueError`` (with the reason) when it is not a committed slot."""
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            crc = body.pop("crc32c")
            if crc32c(json.dumps(body).encode()) != crc:
                raise ValueError("record checksum mismatch")
            if body.get("format") != SHM_FORMAT or body.get("version") != SHM_VERSION:
                raise ValueError(f"format {body.get('format')!r} version {body.get('version')!r}")
            layout = layout_from_json(body["layout"])
            chunk = int(body["chunk_bytes"])
            crcs = tuple(int(x) for x in body["crc32c_chunks"])
            if chunk <= 0 or len(crcs) != -(-layout.total_bytes // chunk):
                raise ValueError("chunk checksums do not cover the stream")
            parts: dict[str, Any] = {}
            if "global_parts" in body:
                from .errors import CorruptCheckpointError
                from .globalmeta import parts_from_json

                try:
                    parts = dict(parts_from_json(body["global_parts"], "slot record"))
                except CorruptCheckpointError as e:
                    raise ValueError(str(e)) from None
            content = CheckpointContent(
                layout, body["skeleton"], tuple(body["numpy_names"]), dict(body["user"]), global_parts=parts
            )
            return cls(
                int(body["slot"]),
                str(body["data"]),
                int(body["step"]),
                int(body["pid"]),
                float(body["created"]),
                chunk,
                crcs,
                content,
                bool(body.get("durable", False)),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed record ({type(e).__name__}: {e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e})") from None


def chunk_crcs(view: memoryview, chunk_bytes: int = VERIFY_CHUNK) -> tuple[int, ...]:
    """crc32c of every ``chunk_bytes`` piece of ``view``."""
    return tuple(crc32c(view[i : i + chunk_bytes]) for i in range(0, len(view), chunk_bytes))


def verify_into(
    src: torch.Tensor,
    record: SlotRecord,
    dst: torch.Tensor | None = None,
    *,
    scatter: Sequence[tuple[int, int, int]] = (),
    where: str = "",
    threads: int = 0,
) -> None:
    """Check every chunk of the uint8 tensor ``src`` against ``record`` and, with ``dst`` (a new uint8 CPU
    buffer, contiguous), copy it there in the same pass: each chunk is checksummed as it is copied
    (:func:`~asymstore.snapshot.copy_crc32c`), so on a mismatch ``dst`` holds unchecked bytes and the caller
    drops it. ``scatter`` (``(offset, nbytes, address)`` sorted by offset) copies those stream ranges to those
    addresses (an in-place restore into the caller's tensors): each chunk is checked before any of it is copied
    there, so a mismatch leaves only checked chunks in the targets. ``threads`` (0: up to 4, as the cores allow)
    split the chunks; the work runs without the GIL. :class:`CorruptCheckpointError` on a mismatch."""
    n = record.total_bytes
    if src.numel() < n or (dst is not None and dst.numel() < n):
        raise CorruptCheckpointError(f"{where}: slot holds {src.numel()} bytes, its record says {n}", (where,))
    k = len(record.crcs)
    workers = max(1, min(threads or min(4, os.cpu_count() or 1), k // 8 or 1))
    if workers == 1:
        _verify_chunks(src, record, dst, scatter, 0, k, where)
        return
    from concurrent.futures import ThreadPoolExecutor

    bounds = [k * i // workers for i in range(workers + 1)]
    with ThreadPoolExecutor(workers, thread_name_prefix="asymstore-verify") as pool:
        for f in [
            pool.submit(_verify_chunks, src, record, dst, scatter, lo, hi, where)
            for lo, hi in itertools.pairwise(bounds)
        ]:
            f.result()


def _verify_chunks(
    src: torch.Tensor,
    record: SlotRecord,
    dst: torch.Tensor | None,
    scatter: Sequence[tuple[int, int, int]],
    first: int,
    last: int,
    where: str,
) -> None:
    from .snapshot import copy_crc32c, host_copy

    c, n = record.chunk_bytes, record.total_bytes
    view = src.numpy().data.cast("B")
    base = src.data_ptr()
    starts = [p[0] for p in scatter]
    for k in range(first, last):
        lo, hi = k * c, min((k + 1) * c, n)
        if dst is not None:
            crc = copy_crc32c(dst.data_ptr() + lo, base + lo, hi - lo)
        else:
            crc = crc32c(view[lo:hi])
        if crc != record.crcs[k]:
            raise CorruptCheckpointError(
                f"{where}: chunk {k} (bytes {lo}..{hi}) of step {record.step} fails its crc32c", (where,)
            )
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        while i < len(scatter) and scatter[i][0] < hi:  # the target ranges this chunk overlaps
            off, nb, addr = scatter[i]
            a, b = max(off, lo), min(off + nb, hi)
            if a < b:
                host_copy(addr + (a - off), base + a, b - a)
            i += 1


# --- CUDA registration ---------------------------------------------------------------------------------------
def _cuda_register(t: torch.Tensor) -> bool:
    """Page-lock a mapping for asynchronous GPU copies (``cudaHostRegister``); False when not possible."""
    if not torch.cuda.is_available() or t.numel() == 0:
        return False
    rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)  # type: ignore[no-untyped-call]
    if int(rc) != 0:
        log.warning(
            "cudaHostRegister of a %d-byte shared slot failed (%s): GPU copies into it are synchronous", t.numel(), rc
        )
        return False
    return True


def _cuda_unregister(t: torch.Tensor) -> None:
    rc = torch.cuda.cudart().cudaHostUnregister(t.data_ptr())  # type: ignore[no-untyped-call]
    if int(rc) != 0:
        log.warning("cudaHostUnregister of a shared slot failed (%s)", rc)


# --- the region ----------------------------------------------------------------------------------------------
@dataclass
class _Mapping:
    name: str
    tensor: torch.Tensor
    registered: bool


class ShmRegion:
    """One job's and rank's region, owned (locked) by this process while open."""

    def __init__(
        self,
        shm_dir: str,
        job: str,
        rank: int,
        *,
        world_size: int = 1,
        url: str = "",
        pin: bool = False,
        replica: bool = False,
    ) -> None:
        self.shm_dir = shm_dir
        self.job = check_job(job)
        self.rank = rank
        self.replica = replica
        self.path = region_path(shm_dir, job, rank, replica=replica)
        self.pin = pin
        self._maps: dict[int, _Mapping] = {}  # slot index -> its current mapping
        self._gen = int(time.time() * 1000) % 10**9
        if not os.path.isdir(shm_dir):
            raise ShmError(
                f"shm_dir {shm_dir!r} is not a directory: give a tmpfs mount (default /dev/shm) or pass "
                "host_memory='private'"
            )
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ShmError(
                f"cannot create the shared-memory region {self.path}: {e}; pass shm_dir= or host_memory='private'"
            ) from e
        self._lock_fd = self._claim()
        try:
            self._check_or_write_header(world_size, url)
        except BaseException:
            self._unlock()
            raise

    # --- ownership --------------------------------------------------------------------------------------------
    def _claim(self) -> int:
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            raise ShmRegionBusyError(
                f"the shared-memory region {self.path} is owned by the live process {owner or '?'} (another store "
                "of the same job and rank); close that store first, or give this one another shm_job= "
                "(or host_memory='private')"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _LOCK_FDS.add(fd)
        return fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            _LOCK_FDS.discard(self._lock_fd)
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _check_or_write_header(self, world_size: int, url: str) -> None:
        hp = os.path.join(self.path, REGION_FILE)
        if os.path.exists(hp):
            try:
                with open(hp, "rb") as f:
                    head = json.loads(f.read())
            except (OSError, ValueError) as e:
                raise ShmFormatError(
                    f"{hp} is unreadable ({e}); remove the region with `asymstore shm rm {self.path}`"
                ) from e
            if not isinstance(head, dict) or head.get("format") != SHM_FORMAT or head.get("version") != SHM_VERSION:
                got = head.get("version") if isinstance(head, dict) else None
                raise ShmFormatError(
                    f"the shared-memory region {self.path} was written by format version {got!r} (this asymstore "
                    f"reads version {SHM_VERSION}); persist it with the asymstore that wrote it, or remove it with "
                    f"`asymstore shm rm {self.path}`"
                )
            return
        head = {
            "format": SHM_FORMAT,
            "version": SHM_VERSION,
            "job": self.job,
            "rank": self.rank,
            "world_size": world_size,
            "url": url,
            "created": time.time(),
        }
        with atomic_file(hp, fsync=False) as f:
            f.write(json.dumps(head).encode())

    # --- slots ------------------------------------------------------------------------------------------------
    def _data_name(self, index: int) -> str:
        self._gen += 1
        return f"slot-{index}.{self._gen}.bin"

    def _record_path(self, index: int) -> str:
        return os.path.join(self.path, f"slot-{index}.json")

    def allocate(self, index: int, nbytes: int) -> torch.Tensor:
        """A fresh mapping of ``nbytes`` for slot ``index`` (its record is gone first; its old file is freed
        once no view of it is left)."""
        self.invalidate(index)
        name = self._data_name(index)
        path = os.path.join(self.path, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)  # reserve now: a full tmpfs is an error here, not a SIGBUS later
            except OSError as e:
                os.close(fd)
                fd = -1
                os.unlink(path)
                if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                    raise self._space_error(nbytes) from e
                raise ShmError(f"cannot reserve {nbytes} bytes in {path}: {e}") from e
            mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            if fd >= 0:
                os.close(fd)
        t = torch.frombuffer(mm, dtype=torch.uint8)
        self._replace(index, _Mapping(name, t, self.pin and _cuda_register(t)))
        return t

    def _space_error(self, nbytes: int) -> ShmSpaceError:
        st = os.statvfs(self.shm_dir)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        held = self.bytes_used()
        return ShmSpaceError(
            f"{self.shm_dir} has no room for a {nbytes}-byte host snapshot slot ({free} bytes free of {total}; this "
            f"region already holds {held}); each of the host_slots needs the state's size. Enlarge it (e.g. "
            "`docker run --shm-size=...` or `mount -o remount,size=... /dev/shm`), pass shm_dir= a larger tmpfs, "
            "lower host_slots, or pass host_memory='private'"
        )

    def _replace(self, index: int, new: _Mapping | None) -> None:
        old = self._maps.pop(index, None)
        if new is not None:
            self._maps[index] = new
        if old is not None:
            if old.registered:
                _cuda_unregister(old.tensor)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, old.name))  # the pages go when the last view of them does

    def invalidate(self, index: int) -> None:
        """Un-commit slot ``index`` (before any byte of it is overwritten)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path(index))

    def release(self, index: int) -> None:
        """Un-commit slot ``index`` and free its file."""
        self.invalidate(index)
        self._replace(index, None)

    def commit(
        self,
        index: int,
        step: int,
        content: CheckpointContent,
        view: memoryview,
        crcs: tuple[int, ...] | None = None,
    ) -> SlotRecord:
        """Checksum slot ``index``'s stream (unless ``crcs``, its ``VERIFY_CHUNK`` checksums, are given) and write
        its record: the slot is committed when this returns."""
        m = self._maps.get(index)
        if m is None:
            raise ShmError(f"slot {index} has no shared mapping")
        if crcs is None:
            crcs = chunk_crcs(view)
        elif len(crcs) != -(-len(view) // VERIFY_CHUNK):
            raise ValueError(f"{len(crcs)} checksums for a stream of {len(view)} bytes")
        rec = SlotRecord(index, m.name, step, os.getpid(), time.time(), VERIFY_CHUNK, crcs, content)
        return self.commit_record(rec)

    def commit_record(self, rec: SlotRecord) -> SlotRecord:
        """Write a slot record made elsewhere (a peer's, for a replica whose bytes were checked against it);
        the slot and data file are this region's."""
        m = self._maps.get(rec.slot)
        if m is None:
            raise ShmError(f"slot {rec.slot} has no shared mapping")
        rec = dataclasses.replace(rec, data=m.name)
        with atomic_file(self._record_path(rec.slot), fsync=False) as f:
            f.write(rec.to_bytes())
        return rec

    def adopt(self) -> list[tuple[SlotRecord, torch.Tensor]]:
        """The committed slots left in the region (by a process that died or closed keeping it), mapped, oldest
        step first; files of torn slots (no valid record) are removed."""
        found: list[tuple[SlotRecord, torch.Tensor]] = []
        keep: set[str] = set()
        for name in sorted(os.listdir(self.path)):
            m = _RECORD_RE.match(name)
            if not m:
                continue
            rp = os.path.join(self.path, name)
            try:
                with open(rp, "rb") as f:
                    rec = SlotRecord.from_bytes(f.read())
                if rec.slot != int(m.group(1)) or not _DATA_RE.match(rec.data):
                    raise ValueError("record names another slot")
                t = self._map_existing(rec)
            except (OSError, ValueError) as e:
                log.warning("ignoring the shared-memory slot record %s: %s", rp, e)
                with contextlib.suppress(OSError):
                    os.unlink(rp)
                continue
            keep.add(rec.data)
            found.append((rec, t))
        for name in os.listdir(self.path):
            if _DATA_RE.match(name) and name not in keep:
                log.info("removing the torn shared-memory slot %s", os.path.join(self.path, name))
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, name))
            elif ".tmp-" in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, name))
        return sorted(found, key=lambda rt: rt[0].step)

    def _map_existing(self, rec: SlotRecord) -> torch.Tensor:
        path = os.path.join(self.path, rec.data)
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < max(rec.total_bytes, 1):
                raise ValueError(f"data file holds {size} bytes, the record says {rec.total_bytes}")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        t = torch.frombuffer(mm, dtype=torch.uint8)
        self._replace(rec.slot, _Mapping(rec.data, t, self.pin and _cuda_register(t)))
        return t

    def records(self) -> list[SlotRecord]:
        """The region's committed slot records (not mapped)."""
        return [r for r, _ in _read_records(self.path)]

    def bytes_used(self) -> int:
        """Bytes of the region's files (what it holds of the shared-memory file system)."""
        return region_bytes(self.path)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._lock_fd < 0

    def close(self, *, remove: bool) -> None:
        """Release the region: remove its files (``remove``), or leave them for the next process."""
        if self.closed:
            return
        for index in list(self._maps):
            m = self._maps.pop(index)
            if m.registered:
                _cuda_unregister(m.tensor)
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.path))  # the job directory, once its last rank is gone
        self._unlock()


#: lock descriptors of the regions this process owns; a forked child (a data-loader worker) closes its copies,
#: so that it never keeps a region locked after its parent died
_LOCK_FDS: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in list(_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).strip()
        return int(raw) if raw else None
    except (OSError, ValueError):
        return None


def _read_records(path: str) -> Iterator[tuple[SlotRecord, str]]:
    for name in sorted(os.listdir(path)):
        if _RECORD_RE.match(name):
            rp = os.path.join(path, name)
            try:
                with open(rp, "rb") as f:
                    yield SlotRecord.from_bytes(f.read()), rp
            except (OSError, ValueError):
                continue


def region_bytes(path: str) -> int:
    """Bytes allocated to the files of the region at ``path``."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(path, name)).st_blocks * 512
    return total


# --- listing and removal (``asymstore shm``) -------------------------------------------------------------------
@dataclass(frozen=True)
class RegionInfo:
    """What ``asymstore shm ls`` shows of a region."""

    path: str
    job: str
    rank: int
    url: str
    version: Any
    bytes: int
    steps: tuple[int, ...]
    owner_pid: int | None
    alive: bool
    #: a replica region: copies of ``rank``'s slots that this node holds for that rank (a peer)
    replica: bool = False

    def to_json(self) -> dict[str, Any]:
        """The row as JSON."""
        return {
            "path": self.path,
            "job": self.job,
            "rank": self.rank,
            "url": self.url,
            "version": self.version,
            "bytes": self.bytes,
            "steps": list(self.steps),
            "owner_pid": self.owner_pid,
            "alive": self.alive,
            "replica": self.replica,
        }


def owner_alive(path: str) -> tuple[int | None, bool]:
    """The pid last recorded as the region's owner, and whether a live process holds its lock."""
    lp = os.path.join(path, LOCK_FILE)
    try:
        fd = os.open(lp, os.O_RDONLY)
    except FileNotFoundError:
        return None, False
    try:
        pid = _read_pid(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return pid, True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return pid, False
    finally:
        os.close(fd)


def list_regions(shm_dir: str) -> list[RegionInfo]:
    """Every region under ``shm_dir``, by job and rank."""
    root = regions_root(shm_dir)
    out: list[RegionInfo] = []
    if not os.path.isdir(root):
        return out
    for job in sorted(os.listdir(root)):
        jd = os.path.join(root, job)
        if not os.path.isdir(jd):
            continue
        for rd in sorted(os.listdir(jd)):
            path = os.path.join(jd, rd)
            m = re.fullmatch(r"(?:replica-)?r(\d{5})", rd)
            if not m or not os.path.isdir(path):
                continue
            head: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(path, REGION_FILE), "rb") as f:
                    loaded = json.loads(f.read())
                if isinstance(loaded, dict):
                    head = loaded
            pid, alive = owner_alive(path)
            steps = tuple(sorted(r.step for r, _ in _read_records(path))) if head.get("version") == SHM_VERSION else ()
            out.append(
                RegionInfo(
                    path,
                    job,
                    int(m.group(1)),
                    str(head.get("url", "")),
                    head.get("version"),
                    region_bytes(path),
                    steps,
                    pid,
                    alive,
                    rd.startswith("replica-"),
                )
            )
    return out


def remove_region(path: str, *, force: bool = False) -> None:
    """Remove the region at ``path``; refused while its owner is alive unless ``force``."""
    if not os.path.isfile(os.path.join(path, LOCK_FILE)) and not os.path.isfile(os.path.join(path, REGION_FILE)):
        raise ShmError(f"{path} is not an asymstore shared-memory region")
    pid, alive = owner_alive(path)
    if alive and not force:
        raise ShmRegionBusyError(
            f"the region {path} is owned by the live process {pid}; stop it first (or pass --force: its snapshots "
            "not yet persisted are then lost)"
        )
    shutil.rmtree(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))
