"""The CUDA paths, on a GPU: host slots (shared memory registered with the CUDA runtime, or pinned) filled by
asynchronous device-to-host copies, every strategy's checkpoints bit-identical to a synchronous copy of the
device state, and a kill-and-resume from shared memory onto the GPU. Skipped with the reason on CPU-only
machines; ``benchmarks/gpu_check.sh`` runs them (with the overhead benchmark on the GPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import asymstore
from asymstore.trainer_hooks import STRATEGIES, AsymCheckpointer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
REPO = Path(__file__).resolve().parents[1]
N_STEPS = 6


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(6)]).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, t: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(64, 512, device="cuda", generator=g)
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def _cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_cpu(v) for v in x]
    return x


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_shared_slots_are_registered_and_device_copies_into_them_are_exact(tmp_path: Path) -> None:
    state = {"w": torch.randn(1 << 20, device="cuda"), "h": torch.randn(999, device="cuda").half(), "n": 3}
    with asymstore.open_store(str(tmp_path / "ck"), shm_dir=str(tmp_path)) as store:
        assert store.host_memory == "shared"
        store.save(state, 1)
        slot = store.host.find(1)
        assert slot is not None and slot.buffer is not None and slot.buffer.is_pinned()
        assert store.host.region is not None and store.host.region._maps[slot.index].registered
        out = store.restore(1)
        assert _equal(out, _cpu(state))
        into = {"w": torch.zeros(1 << 20, device="cuda"), "h": torch.zeros(999, device="cuda").half(), "n": 0}
        store.restore(1, into=into)
        assert torch.equal(into["w"], state["w"]) and torch.equal(into["h"], state["h"])
    # close() unregistered and removed the mapping without a CUDA error
    torch.cuda.synchronize()


@pytest.mark.parametrize("host_memory", ["shared", "private"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_on_cuda_is_bit_identical_to_a_synchronous_copy(
    tmp_path: Path, strategy: str, host_memory: str
) -> None:
    model, opt = _model()
    ref: dict[int, Any] = {}
    ref_model, ref_opt = _model()
    for t in range(1, N_STEPS + 1):
        _step(ref_model, ref_opt, t)
        ref[t] = _cpu({"model": ref_model.state_dict(), "optim": ref_opt.state_dict()})
    store = asymstore.open_store(str(tmp_path / "ck"), shm_dir=str(tmp_path), host_memory=host_memory)
    ck = AsymCheckpointer(model, opt, store, every=1, strategy=strategy, warmup=2)  # type: ignore[arg-type]
    with ck:
        for t in range(1, N_STEPS + 1):
            _step(model, opt, t)
    store.close()
    assert not any(s.skipped or s.error for s in ck.history)
    with asymstore.open_store(str(tmp_path / "ck"), host_memory="private") as fresh:
        for t in range(1, N_STEPS + 1):
            got = fresh.restore(t)
            assert _equal({"model": got["model"], "optim": got["optimizers"][0]}, ref[t]), f"step {t}"


KILLED = """
import os, sys, torch, asymstore
from asymstore.trainer_hooks import AsymCheckpointer
from tests.test_cuda import _model, _step
ck_dir, shm = sys.argv[1], sys.argv[2]
model, opt = _model()
store = asymstore.open_store(ck_dir, shm_dir=shm)
ck = AsymCheckpointer(model, opt, store, every=1, strategy="asym", warmup=2)
with ck:
    for t in range(1, 5):
        _step(model, opt, t)
store.wait()  # step 4's snapshot is complete and committed in shared memory
os.kill(os.getpid(), 9)
"""


def test_kill_and_resume_from_shared_memory_onto_the_gpu(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED), str(tmp_path / "ck"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ref_model, ref_opt = _model()
    for t in range(1, 7):
        _step(ref_model, ref_opt, t)
    model, opt = _model()
    store = asymstore.open_store(str(tmp_path / "ck"), shm_dir=str(tmp_path))
    ck = AsymCheckpointer(model, opt, store, every=1, strategy="asym", warmup=2)
    ck.resume()
    assert store.last_restore is not None and store.last_restore.tier == "host" and ck.step == 4
    assert "left by pid" in store.last_restore.detail
    with ck:
        for t in range(5, 7):
            _step(model, opt, t)
    store.close()
    assert _equal(_cpu(model.state_dict()), _cpu(ref_model.state_dict()))
