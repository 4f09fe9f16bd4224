"""The checkpointing systems of the comparison benchmark, each a variant with one interface.

Real systems run their own code (``torch.save``, DCP ``async_save``, ``torchsnapshot``'s ``Snapshot.async_take``,
DeepSpeed's FastPersist checkpoint engine); systems that do not install here are emulations, named as such,
that reproduce their checkpointing policy on asymstore's storage (host slots, persistence thread, zarr tier):

* ``checkfreq``    CheckFreq: one blocking snapshot copy at the step boundary, persisted in the background
* ``datastates``   DataStates-LLM: equal copy partitions issued during forward and backward (asymstore's ``uniform``)
* ``deepfreeze``   DeepFreeze: after each layer's forward, that layer's parameters and optimizer state are
  queued to one copy thread (fixed, layer-sized partitions, not sized to the measured windows)
* ``gemini``       Gemini: every checkpoint in local host memory and in a peer's host memory (asymstore's peer
  replicas, the peer a second process on this machine), persisted to the disk tier every ``persist_every``
  checkpoints only

Every variant follows :class:`benchmarks.bench_overhead.Variant` (before_block / after_iter / drain /
after_block / stalls / close) and adds ``set_timed``, ``stored_bytes`` (bytes the newest checkpoint occupies
on its durable storage) and ``restore_into`` (the newest checkpoint into a fresh model and optimizer).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from asymstore.snapshot import dest_view
from asymstore.state import flatten
from asymstore.store import PendingSnapshot, SaveHandle, Store, TierSpec
from asymstore.trainer_hooks import AsymCheckpointer
from asymstore.trainer_hooks.torch_hooks import default_blocks
from benchmarks.bench_overhead import AsymstoreVariant, Baseline, DcpAsync, TorchSave, Variant, full_state


def dir_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (a file: its size)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(d, f))
    return total


def load_into(model: torch.nn.Module, opt: torch.optim.Optimizer, msd: Any, osd: Any) -> None:
    model.load_state_dict(msd)
    opt.load_state_dict(osd)


@dataclass(frozen=True)
class Info:
    """What a variant is: the system it stands for, and how (real / emulation / asymstore / reference)."""

    system: str
    how: str
    lossless: bool = True


class CompareMixin:
    """The comparison's additions to a :class:`Variant`."""

    info = Info("", "")

    def set_timed(self, on: bool) -> None:
        """Count the stalls of the following iterations (``True``) or stop counting (``False``)."""

    def stored_bytes(self) -> int:
        return 0

    def restore_into(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
        """Load the newest checkpoint into ``model``/``opt``; returns where it was read from."""
        raise NotImplementedError


class BaselineV(CompareMixin, Baseline):
    info = Info("no checkpointing", "reference")


# --- asymstore and the policies emulated on it --------------------------------------------------------------------
def _restore_asym_dir(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    """The newest step of an asymstore directory, read by a fresh store (private memory: from the tier)."""
    st = Store([path], host_memory="private")
    try:
        out = st.restore()
        load_into(model, opt, out["model"], out["optimizers"][0] if "optimizers" in out else out["optim"])
        rep = st.last_restore
        return rep.tier if rep is not None else "?"
    finally:
        st.close()


class AsymV(CompareMixin, AsymstoreVariant):
    """asymstore (``asym``) or a policy emulated with its hooks (``checkfreq``, ``uniform`` as DataStates-LLM)."""

    def __init__(
        self,
        name: str,
        strategy: str,
        info: Info,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        root: str,
        keep: int,
        *,
        warmup: int,
    ) -> None:
        super().__init__(strategy, model, opt, root, keep, warmup=warmup, name=name)
        self.info = info

    def set_timed(self, on: bool) -> None:
        (self.start_timed if on else self.end_timed)()

    def stored_bytes(self) -> int:
        done = [s for s in self.ck.history if s.stored_bytes]
        return int(done[-1].stored_bytes or 0) if done else 0

    def restore_into(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
        return _restore_asym_dir(self.dir, model, opt)


# --- real systems ------------------------------------------------------------------------------------------------
class TorchSaveV(CompareMixin, TorchSave):
    info = Info("torch.save", "real")

    def set_timed(self, on: bool) -> None:
        self.timed = on

    def stored_bytes(self) -> int:
        return os.path.getsize(self.paths[-1]) if self.paths else 0

    def restore_into(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
        sd = torch.load(self.paths[-1], weights_only=True)
        load_into(model, opt, sd["model"], sd["optim"])
        return "file"


class DcpV(CompareMixin, DcpAsync):
    info = Info("PyTorch DCP async_save", "real")

    def set_timed(self, on: bool) -> None:
        self.timed = on

    def stored_bytes(self) -> int:
        return dir_bytes(self.paths[-1]) if self.paths else 0

    def restore_into(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
        import copy

        self.drain()
        # DCP loads in place: a template of the saved structure (the optimizer's as it was saved, int keys)
        live = self.opt.state_dict()
        osd = {
            "state": {k: {n: torch.empty_like(v) for n, v in s.items()} for k, s in live["state"].items()},
            "param_groups": copy.deepcopy(live["param_groups"]),
        }
        sd = {"model": model.state_dict(), "optim": osd}
        self.dcp.load(sd, checkpoint_id=self.paths[-1])
        load_into(model, opt, sd["model"], sd["optim"])
        return "dcp"


class TorchSnapshotV(CompareMixin, Variant):
    """``torchsnapshot.Snapshot.async_take`` of model and optimizer each iteration; the previous pending snapshot
    is waited for before the next (and before deleting old ones), as DCP's future is."""

    name = "torchsnapshot"
    info = Info("TorchSnapshot", "real")

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, root: str, keep: int) -> None:
        import torchsnapshot

        self.ts = torchsnapshot
        self.model, self.opt, self.keep = model, opt, keep
        self.dir = os.path.join(root, "torchsnapshot")
        os.makedirs(self.dir, exist_ok=True)
        self.step = 0
        self.pending: Any = None
        self.paths: list[str] = []
        self.timed = False
        self._stalls: list[float] = []

    def set_timed(self, on: bool) -> None:
        self.timed = on

    def after_iter(self) -> float:
        t0 = time.perf_counter()
        self.drain()
        while len(self.paths) >= self.keep:
            shutil.rmtree(self.paths.pop(0), ignore_errors=True)
        self.step += 1
        path = os.path.join(self.dir, f"step_{self.step}")
        self.pending = self.ts.Snapshot.async_take(path, app_state={"model": self.model, "optim": self.opt})
        self.paths.append(path)
        dt = time.perf_counter() - t0
        if self.timed:
            self._stalls.append(dt)
        return dt

    def drain(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def stalls(self) -> list[float]:
        return self._stalls

    def stored_bytes(self) -> int:
        return dir_bytes(self.paths[-1]) if self.paths else 0

    def restore_into(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
        self.drain()
        self.ts.Snapshot(self.paths[-1]).restore(app_state={"model": model, "optim": opt})
        return "torchsnapshot"

    def close(self) -> None:
        self.drain()
        shutil.rmtree(self.dir, ignore_errors=True)


def _setup_for_aio_cpu(self: Any, aio_config: dict[str, Any]) -> None:
    from deepspeed.ops.op_builder import AsyncIOBuilder
    from deepspeed.runtime.swap_tensor import constants as sc

    self._dnvme_handle = (
        AsyncIOBuilder()
        .load()
        .aio_handle(
            block_size=aio_config[sc.AIO_BLOCK_SIZE],
            queue_depth=aio_config[sc.AIO_QUEUE_DEPTH],
            single_submit=aio_config[sc.AIO_SINGLE_SUBMIT],
            overlap_events=aio_config[sc.AIO_OVERLAP_EVENTS],
            intra_op_parallelism=aio_config[sc.AIO_INTRA_OP_PARALLELISM],
        )
    )
    self._io_buffer = self._dnvme_handle.new_cpu_locked_tensor(self._io_buffer_size, torch.empty(0, dtype=torch.uint8))
    self._io_buffer.zero_()


def fastpersist_engine(io_buffer_bytes: int = 16 << 20) -> Any:
    """DeepSpeed's FastPersist checkpoint engine (``FastCheckpointEngine``: ``torch.save`` into its ``O_DIRECT``
    async-I/O file writer through a pinned double buffer), configured as DeepSpeed's
    ``"checkpoint": {"writer": {"type": "fast"}}`` section configures it, for one data-parallel writer.
    Needs DeepSpeed's ``async_io`` op (built on first use; needs libaio)."""
    from types import SimpleNamespace

    import deepspeed.io.fast_file_writer as ffw
    import deepspeed.runtime.model_checkpointing.writer_factory as wf
    from deepspeed.ops.op_builder.utils import UtilsBuilder
    from deepspeed.runtime.checkpoint_engine.fast_checkpoint_engine import FastCheckpointEngine
    from deepspeed.runtime.model_checkpointing import constants as c
    from deepspeed.runtime.model_checkpointing.data_parallel_writer_factory import DataParallelWriterConfig
    from deepspeed.runtime.swap_tensor.aio_config import get_aio_config

    # DeepSpeed's CPU accelerator lists no builder for its (plain C++) utils op, which the fast writer needs to
    # view tensors as bytes: the writer gets DeepSpeed's generic builder of that op
    if getattr(ffw.UtilsBuilder, "NAME", "") != UtilsBuilder.NAME:
        ffw.UtilsBuilder = UtilsBuilder
    if not torch.cuda.is_available():
        # and its I/O buffer is pinned with torch's CUDA pinning: without a GPU, the aio handle's own page-locked,
        # aligned host tensor (what DeepSpeed's swapper allocates) takes its place
        wf.CheckpointWriterFactory._setup_for_aio = _setup_for_aio_cpu
    writer = {
        c.CHECKPOINT_WRITER_TYPE: c.CheckpointWriterType.FAST,
        c.CHECKPOINT_IO_BUFFER_SIZE: io_buffer_bytes,
        c.CHECKPOINT_IO_BUFFER_DOUBLE: True,
        c.CHECKPOINT_IO_STATISTICS: False,
        c.CHECKPOINT_DATA_PARALLEL: None,
        c.CHECKPOINT_WRITER_DECOUPLED: False,
        c.CHECKPOINT_IO_MULTIPLIER: 1,
    }
    params = SimpleNamespace(
        checkpoint_config={
            c.CHECKPOINT_TAG_VALIDATION: c.ValidationMode.IGNORE,
            c.CHECKPOINT_SERIALIZATION: True,
            c.CHECKPOINT_WRITER: writer,
        },
        aio_config=get_aio_config({}),
    )
    dp = DataParallelWriterConfig(world_size=1, rank=0, global_rank=0, local_rank=0, pure_dp=True)
    return FastCheckpointEngine(params, dp, optimize_dp_state=False)


class FastPersistV(CompareMixin, Variant):
    """DeepSpeed's FastPersist engine saving model + optimizer state at every step boundary, as DeepSpeed's
    ``save_checkpoint`` calls it (``create`` / ``save`` / ``commit``); the engine's writes are synchronous."""

    name = "fastpersist"
    info = Info("FastPersist (DeepSpeed FastCheckpointEngine)", "real")

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, root: str, keep: int) -> None:
        from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo

        self.commit_info = CheckpointCommitInfo
        self.engine = fastpersist_engine()
        self.model, self.opt, self.keep = model, opt, keep
        self.dir = os.path.join(root, "fastpersist")
        os.makedirs(self.dir, exist_ok=True)
        self.step = 0
        self.paths: list[str] = []
        self.timed = False
        self._stalls: list[float] = []

    def set_timed(self, on: bool) -> None:
        self.timed = on

    def after_iter(self) -> float:
        t0 = time.perf_counter()
        self.step += 1
        tag = f"step_{self.step}"
        info = self.commit_info(tag=tag, save_dir=self.dir, save_latest=False)
        self.engine.create(info)
        path = os.path.join(self.dir, f"{tag}.pt")
        self.engine.save(full_state(self.model, self.opt, self.step), path)
        self.engine.commit(info)
        self.paths.append(path)
        while len(self.paths) > self.keep:
            os.unlink(self.paths.pop(0))
        dt = time.perf_counter() - t0
        if self.timed:
            self._stalls.append(dt)
        return dt

    def stalls(self) -> list[float]:
        return self._stalls

    def stored_bytes(self) -> int:
        return os.path.getsize(self.paths[-1]) if self.paths else 0

    def restore_into(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
        sd = self.engine.load(self.paths[-1], map_location="cpu")
        load_into(model, opt, sd["model"], sd["optim"])
        return "file"

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# --- DeepFreeze (emulation) -------------------------------------------------------------------------------------------
class DeepFreezeV(CompareMixin, Variant):
    """Emulation of DeepFreeze's layer-wise snapshots on asymstore's storage.

    After the optimizer step a host slot is reserved and the tensors that change before the next step (buffers,
    step counters) are copied at once; then each layer's forward post-hook queues that layer's parameters and
    AdamW moments (one fixed, layer-sized partition; tensors outside the layers go with the last layer) to a
    single copy thread. The optimizer's step pre-hook is the barrier: whatever was not queued is queued, the
    queue is awaited, and the slot is committed (asymstore persists it in the background)."""

    name = "deepfreeze"
    info = Info("DeepFreeze", "emulation on asymstore storage")

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, root: str, keep: int) -> None:
        self.model, self.opt = model, opt
        self.dir = os.path.join(root, "deepfreeze")
        self.store = Store([TierSpec(self.dir, keep=max(keep, 1))])
        self.blocks = default_blocks(model)
        self.step = 0
        self.q: queue.Queue[list[tuple[torch.Tensor, torch.Tensor]] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._copier, name="deepfreeze-copy", daemon=True)
        self.thread.start()
        self.hooks: list[Any] = []
        self.snap: PendingSnapshot | None = None
        self.groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.issued: set[int] = set()
        #: layer partitions queued by a forward hook (the rest went at the barrier)
        self.issued_in_forward = 0
        self.handles: list[SaveHandle] = []
        self.timed = False
        self._stalls: list[float] = []
        self._pending_stall = 0.0
        self._error: BaseException | None = None

    def _copier(self) -> None:
        while True:
            group = self.q.get()
            try:
                if group is None:
                    return
                with torch.no_grad():
                    for dst, src in group:
                        dst.copy_(src)
            except BaseException as e:  # re-raised on the training thread at the barrier
                self._error = e
            finally:
                self.q.task_done()

    def set_timed(self, on: bool) -> None:
        self.timed = on

    def before_block(self) -> None:
        for i, blk in enumerate(self.blocks):
            self.hooks.append(blk.register_forward_hook(self._make_hook(i)))
        self.hooks.append(self.opt.register_step_pre_hook(lambda *_: self._barrier()))

    def _make_hook(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if self.snap is not None and torch.is_grad_enabled() and i not in self.issued:
                self.issued.add(i)
                self.issued_in_forward += 1
                self.q.put(self.groups[i])

        return hook

    def _owners(self) -> dict[int, int]:
        """Storage pointer -> layer index, for every parameter of a layer and its optimizer state."""
        own: dict[int, int] = {}
        for i, blk in enumerate(self.blocks):
            for p in blk.parameters():
                own[p.untyped_storage().data_ptr()] = i
                for v in self.opt.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        own[v.untyped_storage().data_ptr()] = i
        return own

    def after_iter(self) -> float:
        """Right after the optimizer step: reserve a slot, copy the volatile tensors, group the rest by layer."""
        t0 = time.perf_counter()
        self.step += 1
        flat = flatten(full_state(self.model, self.opt, self.step))
        stable = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        for s in self.opt.state.values():
            stable.update(v.untyped_storage().data_ptr() for v in s.values() if isinstance(v, torch.Tensor) and v.dim())
        volatile = {
            n for n, t in flat.tensors.items() if t.numel() == 0 or t.untyped_storage().data_ptr() not in stable
        }
        snap = self.store.begin_snapshot(flat, self.step, first=volatile.__contains__)
        if snap is None:
            return time.perf_counter() - t0
        own = self._owners()
        groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.blocks]
        with torch.no_grad():
            for e in snap.layout.tensors:
                src = snap.flat.tensors[e.name]
                if not e.nbytes:
                    continue
                dst = dest_view(snap.buffer, e)
                if e.name in volatile:
                    dst.copy_(src)
                else:
                    groups[own.get(src.untyped_storage().data_ptr(), len(self.blocks) - 1)].append((dst, src))
        self.snap, self.groups, self.issued = snap, groups, set()
        dt = time.perf_counter() - t0
        self._pending_stall = dt
        return dt

    def _barrier(self) -> None:
        if self.snap is None:
            return
        t0 = time.perf_counter()
        snap, self.snap = self.snap, None
        for i, g in enumerate(self.groups):
            if i not in self.issued:
                self.q.put(g)
        self.q.join()
        self.groups = []
        if self._error is not None:
            self.store.abort_snapshot(snap)
            err, self._error = self._error, None
            raise err
        self.handles.append(self.store.commit_snapshot(snap))
        if self.timed:
            self._stalls.append(self._pending_stall + time.perf_counter() - t0)

    def drain(self) -> None:
        self.store.wait()

    def after_block(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self._barrier()
        self.store.wait()

    def stalls(self) -> list[float]:
        return self._stalls

    def stored_bytes(self) -> int:
        for h in reversed(self.handles):
            if h.done():
                reps = h.result().reports
                if reps:
                    return int(next(iter(reps.values())).stored_bytes)
        return 0

    def restore_into(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
        return _restore_asym_dir(self.dir, model, opt)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.after_block()
        self.q.put(None)
        self.thread.join(10)
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Gemini (emulation) ---------------------------------------------------------------------------------------------
class GeminiV(CompareMixin, Variant):
    """Emulation of Gemini on asymstore: every checkpoint is snapshotted (asym hooks) into this process's host
    memory and replicated into a peer's host memory (``peer_replicas=1``; the peer is a second process on this
    machine, standing for another node, with its own shared-memory directory); every ``persist_every``-th
    checkpoint is also written from its host slot to the disk tier by a background thread."""

    name = "gemini"
    info = Info("Gemini", "emulation on asymstore storage (peer replicas)")

    def __init__(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer, root: str, keep: int, warmup: int, persist_every: int
    ) -> None:
        from torch.distributed import TCPStore  # type: ignore[attr-defined]

        self.model, self.opt = model, opt
        self.persist_every = persist_every
        self.dir = os.path.join(root, "gemini")
        self.shm = tempfile.mkdtemp(prefix="asym-gemini-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        job = f"gemini-{os.getpid()}-{id(self):x}"
        os.environ["ASYMSTORE_REPLICA_HOST"] = "127.0.0.1"
        self.kv = TCPStore("127.0.0.1", 0, 2, True, wait_for_workers=False)
        node1 = os.path.join(self.shm, "node1")
        os.makedirs(node1)
        self.peer = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._variants_peer", str(self.kv.port), node1, job],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "ASYMSTORE_REPLICA_HOST": "127.0.0.1"},
        )
        node0 = os.path.join(self.shm, "node0")
        os.makedirs(node0)
        self.host = Store(
            [],
            host_memory="shared",
            shm_job=job,
            shm_dir=node0,
            rank=0,
            world_size=2,
            node_id="node0",
            peer_replicas=1,
            replica_rendezvous=self.kv,
        )
        line = self.peer.stdout.readline() if self.peer.stdout else ""
        if not line.startswith("ready"):
            raise RuntimeError(f"the Gemini peer process did not start: {line!r}")
        self.disk = Store([TierSpec(self.dir, keep=max(keep, 1))], host_memory="private", host_slots=1)
        self.ck = AsymCheckpointer(model, opt, self.host, every=1, strategy="asym", warmup=warmup)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="gemini-persist")
        self.futures: list[Any] = []
        self.persisted: list[tuple[int, int]] = []  # (step, stored bytes)
        self.missed = 0
        self._seen = 0
        self._mark = 0
        self.timed_idx: list[int] = []

    def set_timed(self, on: bool) -> None:
        if on:
            self._mark = len(self.ck.history)
        else:
            self.timed_idx.extend(range(self._mark, len(self.ck.history)))

    def before_block(self) -> None:
        self.ck.attach()

    def _lease(self, handle: SaveHandle) -> None:
        """When a checkpoint to persist is complete in host memory: pin its slot (at once, before the slot can be
        reused), then write it to the disk tier on the persistence thread."""
        slot = self.host.host.lease(handle.step)
        if slot is None or slot.content is None:
            if slot is not None:
                self.host.host.unlease(slot)
            self.missed += 1
            return
        self.futures.append(self.pool.submit(self._persist, handle.step, slot))

    def _persist(self, step: int, slot: Any) -> None:
        try:
            assert self.disk.manager is not None
            rep = self.disk.manager.persist_primary(step, slot.memview(), slot.content)
            self.persisted.append((step, rep.stored_bytes))
        finally:
            self.host.host.unlease(slot)

    def after_iter(self) -> float:
        for h in self.ck.handles[self._seen :]:
            if h.step % self.persist_every == 0:
                h.add_done_callback(self._lease)
        self._seen = len(self.ck.handles)
        return 0.0

    def drain(self) -> None:
        self.ck.wait()
        assert self.host.replicas is not None
        self.host.replicas.drain(60)
        for f in list(self.futures):
            f.result()
        self.futures = []

    def after_block(self) -> None:
        self.ck.detach(finish=True)
        self.after_iter()
        self.drain()

    def stalls(self) -> list[float]:
        return [
            self.ck.history[i].begin_s + self.ck.history[i].stall_s
            for i in self.timed_idx
            if not self.ck.history[i].skipped
        ]

    def stored_bytes(self) -> int:
        return int(self.persisted[-1][1]) if self.persisted else 0

    def host_bytes(self) -> int:
        done = [s for s in self.ck.history if not s.skipped]
        return done[-1].bytes if done else 0

    def restore_into(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
        """The newest checkpoint from this process's host memory (Gemini's recovery path without a lost node)."""
        out = self.host.restore()
        load_into(model, opt, out["model"], out["optimizers"][0])
        rep = self.host.last_restore
        return rep.tier if rep is not None else "host"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ck.detach(finish=True)
            self.drain()
        self.pool.shutdown()
        self.host.close()
        self.disk.close()
        if self.peer.stdin is not None:
            self.peer.stdin.close()
        try:
            self.peer.wait(30)
        except subprocess.TimeoutExpired:
            self.peer.kill()
            self.peer.wait()
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- checking a restore -------------------------------------------------------------------------------------------
def _opt_class(name: str) -> str:
    return name if name in ("exp_avg", "exp_avg_sq") else "exact"


def check_restore(
    model: torch.nn.Module, opt: torch.optim.Optimizer, model2: torch.nn.Module, opt2: torch.optim.Optimizer
) -> dict[str, float]:
    """The largest absolute difference per tensor class (``weight``: model tensors, ``exp_avg``/``exp_avg_sq``:
    AdamW moments, ``exact``: everything else of the optimizer state) between a live and a restored state;
    all zeros and ``mismatch`` 0 when the restore is bit-exact (a missing or misshapen tensor counts in
    ``mismatch``)."""
    err = {"weight": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "exact": 0.0, "mismatch": 0.0}

    def diff(cls: str, a: torch.Tensor, b: Any) -> None:
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            err["mismatch"] += 1
        elif not torch.equal(a, b):
            d = (a.double() - b.double()).abs().max() if a.is_floating_point() else torch.tensor(float("inf"))
            err[cls] = max(err[cls], float(d))

    sd2 = model2.state_dict()
    for k, v in model.state_dict().items():
        diff("weight" if v.is_floating_point() else "exact", v, sd2.get(k))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k, st in s1.items():
        for n, v in st.items():
            if isinstance(v, torch.Tensor):
                diff(_opt_class(n), v, s2.get(k, {}).get(n))
    return err


# --- the registry ----------------------------------------------------------------------------------------------------
#: every variant of the comparison, in table order
VARIANTS = (
    "baseline",
    "asym",
    "datastates",
    "checkfreq",
    "deepfreeze",
    "gemini",
    "excp",
    "fastpersist",
    "torchsnapshot",
    "torch.save",
    "dcp.async_save",
)


def available(name: str) -> str | None:
    """Why ``name`` cannot run here (``None``: it can)."""
    if name == "torchsnapshot":
        try:
            import torchsnapshot  # noqa: F401
        except ImportError as e:
            return f"torchsnapshot is not installed ({e}); pip install torchsnapshot"
    if name == "fastpersist":
        try:
            from deepspeed.ops.op_builder import AsyncIOBuilder
        except ImportError as e:
            return f"DeepSpeed is not installed ({e})"
        if not AsyncIOBuilder().is_compatible(verbose=False):
            return "DeepSpeed's async_io op cannot be built here (libaio-dev missing: apt-get install libaio-dev)"
    if name == "excp":
        from benchmarks import _variants_excp

        return _variants_excp.why_not()
    return None


def make(
    name: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    root: str,
    *,
    keep: int = 2,
    warmup: int = 2,
    persist_every: int = 4,
) -> Variant:
    """The variant ``name`` checkpointing ``model``/``opt`` under ``root``."""
    if name == "baseline":
        return BaselineV()
    if name == "asym":
        return AsymV("asym", "asym", Info("asymstore (asym)", "asymstore"), model, opt, root, keep, warmup=warmup)
    if name == "datastates":
        info = Info("DataStates-LLM", "emulation on asymstore storage (uniform partitions)")
        return AsymV("datastates", "uniform", info, model, opt, root, keep, warmup=warmup)
    if name == "checkfreq":
        info = Info("CheckFreq", "emulation on asymstore storage (blocking snapshot, background persist)")
        return AsymV("checkfreq", "checkfreq", info, model, opt, root, keep, warmup=warmup)
    if name == "deepfreeze":
        return DeepFreezeV(model, opt, root, keep)
    if name == "gemini":
        return GeminiV(model, opt, root, keep, warmup, persist_every)
    if name == "excp":
        from benchmarks import _variants_excp

        return _variants_excp.make(model, opt, root, keep, warmup)
    if name == "fastpersist":
        return FastPersistV(model, opt, root, keep)
    if name == "torchsnapshot":
        return TorchSnapshotV(model, opt, root, keep)
    if name == "torch.save":
        return TorchSaveV(model, opt, root, keep)
    if name == "dcp.async_save":
        return DcpV(model, opt, root, keep)
    raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
