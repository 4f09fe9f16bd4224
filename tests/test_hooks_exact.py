"""Design 2.1: every checkpoint the trainer hooks take is bit-identical to a synchronous copy of the whole
training state taken right after that optimizer step -- for every strategy, on the real local tier.

The reference run trains the same model with the same seed and no checkpointer and deep-copies the state
after each iteration (after ``scheduler.step()``). Each checkpoint is then restored from a *fresh* store on
the same directory (so it comes from disk, not from the host slots) and compared byte for byte."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import asymstore
from asymstore.trainer_hooks import STRATEGIES, AsymCheckpointer, torch_hooks
from asymstore.trainer_hooks.executor import CopyRecord, ThreadCopyExecutor
from tests._hooktest_util import Net, build, deterministic_cpu, full_state, iteration
from tests.helpers import assert_bitequal

N_STEPS = 8
WARMUP = 2
BATCH = 256


@pytest.fixture(autouse=True)
def _deterministic() -> Any:
    with deterministic_cpu(threads=1):
        yield


def reference_run(n: int = N_STEPS, *, d: int = 128, batch: int = BATCH) -> dict[int, dict[str, Any]]:
    model, opt, sched = build(0, d=d)
    ref: dict[int, dict[str, Any]] = {}
    for t in range(1, n + 1):
        loss = iteration(model, opt, sched, batch)
        ref[t] = full_state(model, opt, sched, t, {"batch": t, "loss": loss})
    return ref


_REF_CACHE: dict[tuple[int, int, int], dict[int, dict[str, Any]]] = {}


def reference(n: int = N_STEPS, *, d: int = 128, batch: int = BATCH) -> dict[int, dict[str, Any]]:
    key = (n, d, batch)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = reference_run(n, d=d, batch=batch)
    return _REF_CACHE[key]


def checkpointed_run(
    path: str,
    strategy: str,
    *,
    n: int = N_STEPS,
    d: int = 128,
    batch: int = BATCH,
    executor: Any = None,
    pre_step: Any = None,
    prepare: Callable[[Net], None] | None = None,
    **store_opts: Any,
) -> tuple[AsymCheckpointer, dict[str, Any]]:
    model, opt, sched = build(0, d=d)
    if prepare is not None:
        prepare(model)
    pos: dict[str, Any] = {"batch": 0, "loss": 0.0}
    store = asymstore.open_store(path, **store_opts)
    ck = AsymCheckpointer(
        model,
        opt,
        store,
        every=1,
        scheduler=sched,
        strategy=strategy,  # type: ignore[arg-type]
        warmup=WARMUP,
        extras=lambda: dict(pos),
        trace=True,
    )
    if executor is not None:
        ck._executor = executor
    with ck:
        if pre_step is not None:  # registered after attach: runs after the checkpointer's barrier
            opt.register_step_pre_hook(lambda o, a, k: pre_step(ck))
        for t in range(1, n + 1):
            pos["batch"] = t

            def note(loss: float) -> None:
                pos["loss"] = loss

            iteration(model, opt, sched, batch, before_step=note)
    store.close()
    final = full_state(model, opt, sched, n, dict(pos))
    return ck, final


def check_all_steps(path: str, ref: dict[int, dict[str, Any]], n: int = N_STEPS) -> None:
    with asymstore.open_store(path) as store:  # a new store: no host slots, everything comes from disk
        assert store.steps() == list(range(1, n + 1))
        for t in range(1, n + 1):
            got = store.restore(t)
            assert store.last_restore is not None and store.last_restore.tier == "file"
            try:
                assert_bitequal(got, ref[t])
            except AssertionError as e:
                raise AssertionError(f"checkpoint of step {t}: {e}") from None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_checkpoint_is_bit_identical_to_a_synchronous_copy(tmp_path: Any, strategy: str) -> None:
    ref = reference()
    ck, final = checkpointed_run(str(tmp_path / "ck"), strategy)
    # the hooks do not perturb training: the live state after N steps equals the reference's
    assert_bitequal(final, ref[N_STEPS])
    assert [s.step for s in ck.history] == list(range(1, N_STEPS + 1))
    assert not any(s.skipped or s.error for s in ck.history)
    check_all_steps(str(tmp_path / "ck"), ref)
    if strategy in ("sync", "checkfreq"):  # nothing is hidden: the whole stable region is copied at the step
        assert all(s.hidden_bytes == 0 for s in ck.history)


# --- most bytes move inside the forward/backward windows ------------------------------------------------
# Timings are controlled, so the plans are the same on an idle and on a loaded machine: the checkpointer's
# clock is a FakeClock that only the model advances (each block's forward takes FWD_S, its backward BWD_S), and
# the InlineCopyExecutor copies each range in the training thread when its window opens (no copy thread that a
# busy machine could starve) and times every copy at COPY_BW.

FWD_S, BWD_S, COPY_BW = 0.002, 0.004, 1e9


class FakeClock:
    """Stands in for the ``time`` module of the trainer hooks: ``perf_counter`` moves only when the model says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:  # anything else the hooks might use: the real module
        return getattr(time, name)


class _Tick(torch.autograd.Function):
    """Identity whose backward advances the clock: the backward compute of the block whose output it wraps."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clock: FakeClock, seconds: float) -> torch.Tensor:
        ctx.clock, ctx.seconds = clock, seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.clock.now += ctx.seconds
        return grad, None, None


def timed_by(clock: FakeClock) -> Callable[[Net], None]:
    """Make every block (and the input layer, whose backward closes the last window) take fixed clock time."""

    def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        clock.now += FWD_S
        return _Tick.apply(out, clock, BWD_S)  # type: ignore[no-any-return]

    def prepare(model: Net) -> None:
        for m in [model.inp, *model.blocks]:
            m.register_forward_hook(hook)

    return prepare


class InlineCopyExecutor(ThreadCopyExecutor):
    """Copies a submitted range at once, in the caller (the window's hook), and times each copy at ``bandwidth``."""

    def __init__(self, bandwidth: float) -> None:
        super().__init__()
        self.bandwidth = bandwidth
        self.log: list[CopyRecord] = []

    def submit(self, start: int, end: int, where: str) -> None:
        self.copy_now(start, end, where)

    def _copy(self, rec: CopyRecord) -> None:
        super()._copy(rec)
        rec.t_end = rec.t_begin + rec.nbytes / self.bandwidth
        self.log.append(rec)


@pytest.mark.parametrize("strategy", ["uniform", "asym"])
def test_windows_carry_the_copy_after_warmup(tmp_path: Any, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(torch_hooks, "time", clock)
    ex = InlineCopyExecutor(COPY_BW)
    # width 256: a state of ~3.2 MB (with the AdamW moments), so the warm-up copy measures the bandwidth
    ck, _ = checkpointed_run(str(tmp_path / "ck"), strategy, d=256, batch=64, executor=ex, prepare=timed_by(clock))
    assert ck.summary()["copy_bandwidth"] == pytest.approx(COPY_BW)
    warm = [s for s in ck.history if s.step < WARMUP]
    # the last checkpoint has no next iteration: detach() copies it whole
    planned = [s for s in ck.history if WARMUP <= s.step < N_STEPS]
    assert warm and planned and len(ck.history) == N_STEPS
    for s in warm:  # warm-up: no profile yet, everything at the step
        assert s.hidden_bytes == 0 and s.step_copy_bytes > 0, s
    for s in planned:  # the windows (36 ms at 1 GB/s) hold the whole state several times over: no remainder
        assert s.step_copy_bytes == 0, s
        assert s.hidden_bytes > 0.99 * s.bytes, s
    fwd = [r.nbytes for r in ex.log if r.where == "forward"]
    bwd = [r.nbytes for r in ex.log if r.where == "backward"]
    assert fwd and bwd
    if strategy == "asym":  # each range is its window's share: backward windows are twice as long
        assert sum(bwd) / len(bwd) > 1.3 * sum(fwd) / len(fwd), (fwd, bwd)
        assert ck.summary()["hidden_fraction"] > 0.5


# --- the barrier ---------------------------------------------------------------------------------------


class SlowCopyExecutor(ThreadCopyExecutor):
    """Every window's range is taken by the copy thread (``submit`` returns once the thread has it) and copied
    late, so without a barrier it would read tensors the optimizer step is updating."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.delayed = 0
        self._taken = threading.Semaphore(0)

    def submit(self, start: int, end: int, where: str) -> None:
        super().submit(start, end, where)
        self._taken.acquire()  # the copy thread has started it: the barrier must wait for its piece in flight

    def _claim(self, r: Any) -> tuple[int, int] | None:
        first = not r.started
        piece = super()._claim(r)
        if piece is not None and first and threading.current_thread() is self._thread:
            self._taken.release()
        return piece

    def _copy_bytes(self, start: int, end: int, *, background: bool) -> None:
        if background:
            time.sleep(self.delay_s)
            self.delayed += 1
        super()._copy_bytes(start, end, background=background)


@pytest.mark.parametrize("strategy", ["uniform", "asym"])
def test_barrier_waits_for_slow_copies(tmp_path: Any, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = reference()
    clock = FakeClock()  # fixed windows: the same plans, so the same ranges in windows, on any machine
    monkeypatch.setattr(torch_hooks, "time", clock)
    slow = SlowCopyExecutor(delay_s=0.02)
    observed: list[tuple[int, bool, int]] = []

    def pre_step(ck: AsymCheckpointer) -> None:
        # runs right before the optimizer modifies anything (after the checkpointer's own pre-hook):
        # no snapshot may be in flight and no copy may be pending
        observed.append((ck.step, ck._active is None, slow.pending))

    _, final = checkpointed_run(
        str(tmp_path / "ck"), strategy, executor=slow, pre_step=pre_step, prepare=timed_by(clock)
    )
    assert slow.delayed > 0, "no range was copied in a window: the test proves nothing"
    assert len(observed) == N_STEPS
    assert all(idle and pending == 0 for _, idle, pending in observed), observed
    assert_bitequal(final, ref[N_STEPS])
    check_all_steps(str(tmp_path / "ck"), ref)
