"""Every variant of the comparison benchmark (benchmarks/compare.py) checkpoints a few steps of a tiny model and
its newest checkpoint restores into a fresh model and optimizer: bit-exact for the lossless ones, within the
error bounds its manifest records for ExCP."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import _variants as V
from benchmarks._families import Family, build, train_step
from benchmarks.compare import run_block

# the quick suite runs one variant of each mechanism (asymstore hooks, step-boundary copy, a plain file); the
# others (several seconds each on 2 cores: a peer process, torchsnapshot's and DCP's planners) are slow-marked
SLOW = pytest.mark.slow
VARIANTS = [
    "asym",
    "checkfreq",
    "torch.save",
    pytest.param("datastates", marks=SLOW),
    pytest.param("deepfreeze", marks=SLOW),
    pytest.param("gemini", marks=SLOW),
    pytest.param("torchsnapshot", marks=SLOW),
    pytest.param("dcp.async_save", marks=SLOW),
]


def _family(name: str = "gpt2") -> Family:
    fam = build(name, "tiny")
    train_step(fam)
    return fam


def _run(v: Any, fam: Family, blocks: int = 2) -> None:
    for _ in range(blocks):
        run_block(v, fam, warmup=1, block=2)  # 3 checkpoints per block


def _skip_unavailable(name: str) -> None:
    why = V.available(name)
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_restores_bit_exact(name: str, tmp_path: Path) -> None:
    _skip_unavailable(name)
    fam = _family()
    v: Any = V.make(name, fam.model, fam.opt, str(tmp_path), keep=2, warmup=1, persist_every=2)
    try:
        _run(v, fam)
        model2, opt2 = fam.fresh()
        assert V.check_restore(fam.model, fam.opt, model2, opt2)["weight"] > 0  # a fresh model differs
        v.restore_into(model2, opt2)
        err = V.check_restore(fam.model, fam.opt, model2, opt2)
        assert all(x == 0 for x in err.values()), err
        assert v.stalls(), "no checkpoint was counted in the timed iterations"
        assert v.stored_bytes() > 0
        if name == "gemini":
            assert v.persisted and all(step % 2 == 0 for step, _ in v.persisted), v.persisted
            assert v.missed == 0
            peer, steps = v.host.replicas.remote_steps()
            assert peer == 1 and max(steps) == v.ck.step, (peer, steps, v.ck.step)
        if name == "deepfreeze":
            assert v.issued_in_forward >= len(v.blocks)  # layer partitions went out during forward
    finally:
        v.close()


def test_deepfreeze_restores_batchnorm_buffers_bit_exact(tmp_path: Path) -> None:
    # ResNet's running statistics change in forward: copied when the snapshot begins, not by the layer hooks
    fam = _family("resnet")
    v: Any = V.make("deepfreeze", fam.model, fam.opt, str(tmp_path), keep=2)
    try:
        _run(v, fam, blocks=1)
        model2, opt2 = fam.fresh()
        v.restore_into(model2, opt2)
        err = V.check_restore(fam.model, fam.opt, model2, opt2)
        assert all(x == 0 for x in err.values()), err
        assert v.issued_in_forward >= len(v.blocks)  # layer partitions went out during forward
        bn = [k for k in fam.model.state_dict() if k.endswith("running_mean")]
        assert bn and all(torch.equal(fam.model.state_dict()[k], model2.state_dict()[k]) for k in bn)
    finally:
        v.close()


def test_check_restore_sees_one_changed_element() -> None:
    fam = _family()
    model2, opt2 = fam.fresh()
    model2.load_state_dict(fam.model.state_dict())
    opt2.load_state_dict(fam.opt.state_dict())
    assert all(x == 0 for x in V.check_restore(fam.model, fam.opt, model2, opt2).values())
    with torch.no_grad():
        next(model2.parameters()).view(-1)[0] += 1e-3
    assert V.check_restore(fam.model, fam.opt, model2, opt2)["weight"] > 0


def test_excp_restore_is_lossy_within_recorded_bounds(tmp_path: Path) -> None:
    _skip_unavailable("excp")
    fam = _family()
    v: Any = V.make("excp", fam.model, fam.opt, str(tmp_path), keep=2, warmup=1)
    try:
        _run(v, fam)
        model2, opt2 = fam.fresh()
        source = v.restore_into(model2, opt2)
        assert "lossy=True" in source, source
        err = V.check_restore(fam.model, fam.opt, model2, opt2)
        errors = v.archive_manifest().lossy["errors"]
        assert err["mismatch"] == 0 and err["exact"] == 0, err
        for cls in ("weight", "exp_avg", "exp_avg_sq"):
            assert err[cls] <= errors[cls]["bound"], (cls, err[cls], errors[cls])
            # the measured error is the one recorded at write time (same reconstruction)
            assert err[cls] == pytest.approx(errors[cls]["max_abs"], rel=1e-6, abs=1e-12), (cls, err, errors)
        assert err["weight"] > 0  # lossy for real
        lossless = sum(s.bytes for s in v.ck.history[-1:])
        assert 0 < v.stored_bytes() < lossless / 2, (v.stored_bytes(), lossless)
    finally:
        v.close()


def _ds_ops_built() -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    return all(os.path.exists(os.path.join(_get_build_directory(n, False), f"{n}.so")) for n in ("async_io", "utils"))


@pytest.mark.slow
def test_fastpersist_restores_bit_exact(tmp_path: Path) -> None:
    _skip_unavailable("fastpersist")
    if not os.environ.get("ASYMSTORE_BUILD_DS_OPS"):
        # building DeepSpeed's async I/O and utils ops takes 4-8 minutes on 2 cores, and DeepSpeed rebuilds them
        # whenever its sources moved (another checkout or venv), even when a build directory exists: more than
        # the suite's budget for one test, so this test is opt-in
        pytest.skip(
            "set ASYMSTORE_BUILD_DS_OPS=1 to run it (builds DeepSpeed's async_io/utils ops when needed, 4-8 min); "
            f"ops built here: {_ds_ops_built()}"
        )
    fam = _family()
    v: Any = V.make("fastpersist", fam.model, fam.opt, str(tmp_path), keep=2)
    try:
        _run(v, fam)
        assert len(os.listdir(v.dir)) == 2  # keep=2: older files deleted
        model2, opt2 = fam.fresh()
        v.restore_into(model2, opt2)
        err = V.check_restore(fam.model, fam.opt, model2, opt2)
        assert all(x == 0 for x in err.values()), err
        assert v.stored_bytes() > 0 and v.stalls()
    finally:
        v.close()
