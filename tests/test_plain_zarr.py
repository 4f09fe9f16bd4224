"""A checkpoint is readable by plain zarr-python (separate process, no asymstore, no torch) and tensorstore.

The plain reader (tests/plain_zarr_reader.py) implements docs/format.md; these tests hold asymstore's
writer to that specification: every codec chain, XOR deltas, multi-rank steps, escaped tensor names, the
skeleton's tagged forms, the checksums and the refusal of an unknown format version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

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
        # names that need escaping (docs/format.md §8.1) and the skeleton's tagged forms (§8)
        "a/b": {"50%": torch.full((4,), float(step)), "__k": torch.tensor([1, 2], dtype=torch.int16)},
        "np": np.arange(6, dtype=np.float64).reshape(2, 3),
        "extra": {"t": (1, 2.5, float("nan")), "bytes": b"\x00hi", "np_scalar": np.float32(1.5), 3: "int key"},
    }


def _expected(state: dict) -> dict[str, list]:
    from asymstore.state import flatten

    flat = flatten(state)
    return {
        n: [info(t.dtype).view_dtype, info(t.dtype).torch_name, list(t.shape), digest(tensor_bytes(t))]
        for n, t in flat.tensors.items()
    }


def _render(v: object) -> object:
    """The state as the plain reader renders its decoded skeleton (plain_zarr_reader.render)."""
    if isinstance(v, torch.Tensor):
        return "tensor:" + digest(tensor_bytes(v))
    if isinstance(v, np.ndarray):
        return "tensor:" + digest(np.ascontiguousarray(v).tobytes())
    if isinstance(v, dict):
        return {k if isinstance(k, str) else repr(k): _render(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_render(x) for x in v]
    if isinstance(v, np.generic):
        return f"np:{v.dtype.str}:{v.item()!r}"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, bytes):
        return "bytes:" + v.hex()
    return v


def _plain_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # nothing of asymstore on the path of the plain reader
    return env


def _run(root: str, *args: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", READER, root, *map(str, args)],
        capture_output=True,
        text=True,
        env=_plain_env(),
        timeout=120,
    )


def _run_reader(root: str, step: int, rank: int = 0) -> dict:
    out = _run(root, step, rank)
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
    attrs = json.loads(Path(os.path.join(root, "step_000000000011", labels[11][0], "zarr.json")).read_text())[
        "attributes"
    ]
    assert attrs["asymstore"]["transform"] == {"xor_with_step": 10}


@pytest.mark.parametrize("step", [1, 2, 3, 4, 10, 11])
def test_plain_zarr_process_reads_every_tensor(mixed_checkpoint, step: int) -> None:
    root, states = mixed_checkpoint
    got = _run_reader(root, step)
    assert got["steps"] == [1, 2, 3, 4, 10, 11]
    assert got["tensors"] == _expected(states[step])
    assert got["tree"] == _render(states[step])


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


def test_escaped_names_in_the_layout(mixed_checkpoint) -> None:
    root, _ = mixed_checkpoint
    m = json.loads(Path(os.path.join(root, "step_000000000001", "zarr.json")).read_text())["attributes"]["asymstore"]
    names = [t[0] for t in m["layout"]["tensors"]]
    assert "a%2Fb/50%25" in names and "a%2Fb/__k" in names and "nested/opt/0" in names
    assert m["skeleton"]["a/b"]["____k"] == {"__tensor__": "a%2Fb/__k"}
    assert m["numpy_names"] == ["np"]
    assert m["numpy_view_dtypes"]["bfloat16"] == "<u2" and m["numpy_view_dtypes"]["float8_e4m3fn"] == "|u1"
    offsets = [t[3] for t in m["layout"]["tensors"]]
    assert offsets == sorted(offsets) and all(o % m["layout"]["align"] == 0 for o in offsets)


def test_markers_verify_by_the_spec_rule(mixed_checkpoint) -> None:
    """docs/format.md §9: crc32c of the bytes before the last ',"crc32c":' plus '}'."""
    from asymstore.manifest import parse_commit
    from asymstore.zarrfmt import crc32c

    root, _ = mixed_checkpoint
    for s in (1, 2, 3, 4, 10, 11):
        raw = Path(os.path.join(root, f"step_{s:012d}", "COMMIT")).read_bytes()
        body = parse_commit(raw, "COMMIT")
        i = raw.rfind(b',"crc32c":')
        assert crc32c(raw[:i] + b"}") == json.loads(raw)["crc32c"]
        assert list(json.loads(raw)) == [*body, "crc32c"]
        assert body["objects"] == len([f for _, _, fs in os.walk(os.path.join(root, f"step_{s:012d}")) for f in fs])


def _world(root: str, step: int, world: int) -> dict[int, dict]:
    """Each rank of a ``world``-rank job saves its own state of ``step`` (threads of one process)."""
    states = {r: _state(step + r) for r in range(world)}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            with Store([root], rank=r, world_size=world, commit_timeout_s=60.0, **SMALL) as s:
                s.save(states[r], step)
        except BaseException as e:  # surfaced by the test
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in reversed(range(world))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return states


def test_multi_rank_step(tmp_path) -> None:
    root = str(tmp_path)
    states = _world(root, 20, 3)
    step = os.path.join(root, "step_000000000020")
    assert sorted(os.listdir(step)) == ["COMMIT", "r00000", "r00001", "r00002", "zarr.json"]
    glob = json.loads(Path(os.path.join(step, "COMMIT")).read_text())
    assert glob["ranks"] == 3 and sorted(glob["shards_crc32c"]) == ["0", "1", "2"]
    assert json.loads(Path(os.path.join(step, "zarr.json")).read_text())["attributes"] == {
        "asymstore": {"step": 20, "ranks": 3}
    }
    for r in range(3):
        got = _run_reader(root, 20, r)
        assert got["steps"] == [20]
        assert got["tensors"] == _expected(states[r]) and got["tree"] == _render(states[r])
    assert _run(root, 20, 3).returncode == 2


def _rewrite_manifest(step_dir: str, change) -> None:
    """Change a committed checkpoint's manifest and re-seal its marker (a writer of another version)."""
    from asymstore.zarrfmt import crc32c, dumps

    group = json.loads(Path(os.path.join(step_dir, "zarr.json")).read_text())
    change(group["attributes"]["asymstore"])
    raw = dumps(group)
    Path(os.path.join(step_dir, "zarr.json")).write_bytes(raw)
    marker = json.loads(Path(os.path.join(step_dir, "COMMIT")).read_text())
    marker.pop("crc32c")
    marker["group_crc32c"] = crc32c(raw)
    marker["crc32c"] = crc32c(dumps(marker))
    Path(os.path.join(step_dir, "COMMIT")).write_bytes(dumps(marker))


def test_unknown_format_version_is_refused(tmp_path) -> None:
    from asymstore import open_checkpoint
    from asymstore.errors import CorruptCheckpointError

    root = str(tmp_path)
    with Store([root], **SMALL) as s:
        s.save(_state(1), 1)
        s.save(_state(2), 2)
    _rewrite_manifest(os.path.join(root, "step_000000000002"), lambda m: m.update(format="asymstore/2"))
    out = _run(root, 2)
    assert out.returncode == 2 and "unknown checkpoint format 'asymstore/2'" in out.stderr
    with pytest.raises(CorruptCheckpointError, match="unknown checkpoint format"):
        open_checkpoint(root, step=2)
    # a field this version does not know is ignored (a compatible addition)
    _rewrite_manifest(os.path.join(root, "step_000000000001"), lambda m: m.update(future_field={"x": 1}))
    assert _run_reader(root, 1)["tensors"] == _expected(_state(1))
    assert open_checkpoint(root, step=1).step == 1


def test_damaged_chunk_is_refused(tmp_path) -> None:
    root = str(tmp_path)
    with Store([root], compression="none", **SMALL) as s:
        s.save(_state(1), 1)
    shard = os.path.join(root, "step_000000000001", "raw", "c", "0")
    data = bytearray(Path(shard).read_bytes())
    data[5] ^= 1
    Path(shard).write_bytes(bytes(data))
    out = _run(root, 1)
    assert out.returncode == 2 and "chunk 0 checksum mismatch" in out.stderr
