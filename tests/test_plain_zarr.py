"""A checkpoint is readable by plain zarr-python (separate process, no asymstore, no torch) and tensorstore."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from asymstore import Store
from asymstore.dtypes import info

from .helpers import digest, random_tensor, tensor_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
READER = os.path.join(HERE, "plain_zarr_reader.py")
SMALL = dict(chunk_bytes=4096, partition_bytes=16384)


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(3000, 5, generator=g)  # ~60 KB: several partitions
    w[::7] += step  # sparse change per step, so deltas differ from their base
    return {
        "w": w,
        "bf16": random_tensor(torch.bfloat16, (700, 3), 11 + step),
        "f8": random_tensor(torch.float8_e4m3fn, (123,), 5),
        "c64": random_tensor(torch.complex64, (9, 2), 6),
        "i8": torch.arange(-64, 64, dtype=torch.int8).repeat(40),
        "b": torch.tensor([True, False, True]),
        "scalar": torch.tensor(step, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "nested": {"opt": [torch.zeros(2000), {"m": torch.ones(50, 50, dtype=torch.float16)}]},
        "step": step,
    }


def _expected(state: dict) -> dict[str, list]:
    from asymstore.state import flatten

    flat = flatten(state)
    return {
        n: [info(t.dtype).view_dtype, info(t.dtype).torch_name, list(t.shape), digest(tensor_bytes(t))]
        for n, t in flat.tensors.items()
    }


def _plain_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # nothing of asymstore on the path of the plain reader
    return env


def _run_reader(root: str, step: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-I", READER, root, str(step)], capture_output=True, text=True, env=_plain_env(), timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory) -> tuple[str, dict[int, dict]]:
    """Steps with raw, zstd, blosc(+lz4) and an XOR delta step, written by asymstore."""
    root = str(tmp_path_factory.mktemp("plain"))
    states = {}
    plan = [
        (1, dict(compression="none")),
        (2, dict(compression="zstd3")),
        (3, dict(compression="blosc-shuffle")),
        (4, dict(compression="lz4")),
        (10, dict(compression="xor-zstd", delta_every=4)),
        (11, dict(compression="xor-zstd", delta_every=4)),
    ]
    delta_store = None
    for step, kw in plan:
        states[step] = _state(step)
        if "delta_every" in kw:  # the base and its delta must go through one store (it keeps the base)
            delta_store = delta_store or Store([root], **SMALL, **kw)
            delta_store.save(states[step], step)
        else:
            with Store([root], **SMALL, **kw) as s:
                s.save(states[step], step)
    assert delta_store is not None
    delta_store.close()
    return root, states


def test_labels_written(mixed_checkpoint) -> None:
    root, _ = mixed_checkpoint
    labels = {
        s: sorted(
            d
            for d in os.listdir(os.path.join(root, f"step_{s:012d}"))
            if os.path.isdir(os.path.join(root, f"step_{s:012d}", d))
        )
        for s in (1, 2, 3, 4, 10, 11)
    }
    assert labels[1] == ["raw"]
    assert labels[2] == ["zstd3"]
    assert labels[3] == ["blosc-zstd1-shuf-t4"]
    assert labels[4] == ["blosc-lz45"]
    assert labels[10] == ["blosc-zstd1-shuf-t4"]  # the base: no delta
    assert labels[11] == ["xor-blosc-zstd1-shuf-t4"]
    attrs = json.load(open(os.path.join(root, "step_000000000011", labels[11][0], "zarr.json")))["attributes"]
    assert attrs["asymstore"]["transform"] == {"xor_with_step": 10}


@pytest.mark.parametrize("step", [1, 2, 3, 4, 10, 11])
def test_plain_zarr_process_reads_every_tensor(mixed_checkpoint, step: int) -> None:
    root, states = mixed_checkpoint
    got = _run_reader(root, step)
    assert got["steps"] == [1, 2, 3, 4, 10, 11]
    assert got["tensors"] == _expected(states[step])


def test_plain_reader_does_not_import_asymstore(mixed_checkpoint) -> None:
    """The check inside the reader is real: running it with asymstore preloaded fails."""
    root, _ = mixed_checkpoint
    code = (
        f"import sys, runpy; import numpy; sys.modules['torch'] = numpy; sys.argv = ['r', {root!r}, '1']; "
        f"runpy.run_path({READER!r}, run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, env=_plain_env())
    assert out.returncode != 0 and "imported asymstore/torch" in out.stderr


def test_tensorstore_reads_the_same_arrays(mixed_checkpoint) -> None:
    ts = pytest.importorskip("tensorstore")
    import zarr

    root, _ = mixed_checkpoint
    n = 0
    for step in (1, 2, 3, 4, 10, 11):
        d = os.path.join(root, f"step_{step:012d}")
        for label in os.listdir(d):
            path = os.path.join(d, label)
            if not os.path.isdir(path):
                continue
            a = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}, open=True, read=True).result()
            got = a.read().result()
            want = zarr.open_array(path, mode="r")[:]
            assert got.dtype == np.uint8 and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), (step, label)
            n += 1
    assert n == 6
