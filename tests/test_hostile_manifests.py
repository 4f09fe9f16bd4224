"""Hostile manifests and commit markers whose checksums were recomputed: every case is a clear
``CorruptCheckpointError`` (restore falls back to an intact step, ``asymstore verify`` exits 1, ``ls`` and
``show`` answer without a traceback) or a correct read, in bounded time and memory.

The faults come in classes (types, offsets and sizes, partition records, skeleton, delta chains, nesting,
commit markers, symlinks); a Hypothesis fuzzer then replaces any member of a real manifest or marker with
hostile values.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asymstore import Store
from asymstore.catalog import open_reader
from asymstore.cli import main as cli
from asymstore.config import Config
from asymstore.errors import CorruptCheckpointError
from asymstore.lazy import LazyCheckpoint
from asymstore.manifest import step_dir
from asymstore.zarrfmt import crc32c, dumps

Mutation = Callable[[dict[str, Any]], Any]


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(64, 33, generator=g),
        "b": torch.arange(7, dtype=torch.int16) + step,
        "h": torch.randn(300, generator=g).to(torch.bfloat16),
        "opt": {"lr": 0.1, "betas": (0.9, 0.99), "n": np.arange(5, dtype=np.int32)},
        "step": step,
    }


#: host slots in this process's memory where the store offers shared ones too
_PRIVATE = {"host_memory": "private"} if "host_memory" in {f.name for f in dataclasses.fields(Config)} else {}


def _opts(**kw: Any) -> dict[str, Any]:
    return {**_PRIVATE, "background_idle": False, **kw}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Steps 1 and 2, full checkpoints, on one local tier (several partitions: small chunks)."""
    root = str(tmp_path_factory.mktemp("pristine") / "ck")
    with Store([root], **_opts(chunk_bytes=4096, partition_bytes=8192, compression="zstd3")) as s:
        for step in (1, 2):
            s.save(_state(step), step)
    return root


@pytest.fixture(scope="module")
def pristine_delta(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Step 0 (full, the base) and steps 1 and 2 (XOR deltas of step 0)."""
    root = str(tmp_path_factory.mktemp("pristine_delta") / "ck")
    with Store([root], **_opts(delta_every=3, compression="xor-zstd")) as s:
        for step in (0, 1, 2):
            s.save(_state(step), step)
    return root


def _copy(src: str, tmp_path: Any) -> str:
    dst = str(tmp_path / f"ck{time.monotonic_ns()}")
    shutil.copytree(src, dst)
    return dst


def _paths(root: str, step: int) -> tuple[str, str]:
    d = os.path.join(root, step_dir(step))
    return os.path.join(d, "zarr.json"), os.path.join(d, "COMMIT")


def rewrite(
    root: str,
    step: int,
    manifest: Mutation | None = None,
    commit: Mutation | None = None,
    raw_group: Callable[[bytes], bytes] | None = None,
) -> None:
    """Change a step's manifest and/or commit marker, then recompute every checksum (as an attacker would).

    ``manifest``/``commit`` get the parsed object and may change it in place or return a replacement.
    """
    gpath, cpath = _paths(root, step)
    with open(gpath, "rb") as f:
        group = f.read()
    if manifest is not None:
        doc = json.loads(group)
        m = doc["attributes"]["asymstore"]
        out = manifest(m)
        doc["attributes"]["asymstore"] = m if out is None else out
        group = json.dumps(doc, separators=(",", ":")).encode()  # NaN allowed: hostile
    if raw_group is not None:
        group = raw_group(group)
    with open(gpath, "wb") as f:
        f.write(group)
    with open(cpath, "rb") as f:
        body = json.loads(f.read())
    body.pop("crc32c")
    body["group_crc32c"] = crc32c(group)
    if commit is not None:
        out = commit(body)
        body = body if out is None else out
    raw = json.dumps(body, separators=(",", ":")).encode()
    if isinstance(body, dict):
        body["crc32c"] = crc32c(raw)
        raw = json.dumps(body, separators=(",", ":")).encode()
    with open(cpath, "wb") as f:
        f.write(raw)


def _bytes_of(v: Any) -> bytes:
    if isinstance(v, torch.Tensor):
        return v.contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b""
    return np.ascontiguousarray(v).tobytes()


def _tensors(state: Any, path: str = "") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if isinstance(state, (torch.Tensor, np.ndarray)):
        out[path] = _bytes_of(state)
    elif isinstance(state, dict):
        for k, v in state.items():
            out.update(_tensors(v, f"{path}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_tensors(v, f"{path}/{i}"))
    return out


class Bounded:
    """Time and peak-memory bound of what runs inside it."""

    def __init__(self, seconds: float = 10.0, mib: int = 512) -> None:
        self.seconds, self.mib = seconds, mib

    def __enter__(self) -> Bounded:
        self.t0 = time.perf_counter()
        self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return self

    def __exit__(self, *exc: object) -> None:
        dt = time.perf_counter() - self.t0
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss0) / 1024
        assert dt < self.seconds, f"took {dt:.1f} s"
        assert grew < self.mib, f"peak memory grew by {grew:.0f} MiB"


def read_or_refuse(root: str, step: int) -> str:
    """Open and read ``step`` every way asymstore reads: whole, lazily, and verify. Either every read refuses
    with ``CorruptCheckpointError`` or every read gives the saved bytes. Returns "corrupt" or "ok"."""
    from asymstore.backends.local import LocalObjectStore

    backend = LocalObjectStore(root)
    want = _tensors(_state(step))
    try:
        r = open_reader(backend, step)
        buf = bytearray(max(r.manifest.layout.total_bytes, 1))
        r.read_all_into(memoryview(buf))
        got = LazyCheckpoint(open_reader(backend, step)).load()
        rep = open_reader(backend, step).verify()
    except CorruptCheckpointError as e:
        assert str(e) and e.objects, "a CorruptCheckpointError names the damaged object"
        return "corrupt"
    if not rep.ok:
        return "corrupt"
    have = _tensors(got)
    for path, b in have.items():  # every tensor read is the saved one (its bytes; the manifest may rename dtypes)
        if path in want:
            assert b == want[path], f"{path}: wrong bytes"
    return "ok"


def assert_falls_back(root: str, bad: int, good: int) -> None:
    """``restore()`` gives the intact older step, ``verify --all`` exits 1, ``ls``/``show`` answer."""
    with Store([root], **_opts()) as s:
        got = s.restore()
        assert s.last_restore is not None and s.last_restore.step == good
        assert _tensors(got) == _tensors(_state(good))
    assert cli(["-q", "verify", root, "--all"]) == 1
    assert cli(["-q", "verify", root, "--step", str(good)]) == 0
    assert cli(["ls", root, "--json"]) == 0
    assert cli(["-q", "show", root, "--step", str(bad)]) == 1


# --- classes of faults ---------------------------------------------------------------------------------------
def _tensor_entry(name: str, field: int, value: Any) -> Mutation:
    def mut(m: dict[str, Any]) -> None:
        for e in m["layout"]["tensors"]:
            if e[0] == name:
                e[field] = value

    return mut


def _set(path: str, value: Any) -> Mutation:
    def mut(m: dict[str, Any]) -> None:
        *head, last = path.split(".")
        d = m
        for k in head:
            d = d[int(k)] if isinstance(d, list) else d[k]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value

    return mut


def _deep(n: int) -> Any:
    v: Any = 1
    for _ in range(n):
        v = {"a": v}
    return v


MANIFEST_FAULTS: dict[str, Mutation] = {
    # types
    "manifest is a list": lambda m: [m],
    "manifest is a string": lambda m: "asymstore/1",
    "step is a string": _set("step", "2"),
    "layout is a list": _set("layout", []),
    "total_bytes is a float": _set("layout.total_bytes", 1e3),
    "partitions is an object": _set("partitions", {}),
    "codecs entry is a string": lambda m: m["codecs"].update({k: "zstd" for k in m["codecs"]}),
    # offsets and sizes
    "negative tensor offset": _tensor_entry("w", 3, -64),
    "offset past the stream": _tensor_entry("b", 3, 10**9),
    "offset inside the previous tensor": _tensor_entry("b", 3, 64),
    "nbytes != shape x itemsize": _tensor_entry("w", 4, 64 * 33 * 4 - 4),
    "huge shape": _tensor_entry("w", 2, [2**40, 2**40]),
    "negative shape": _tensor_entry("w", 2, [-64, -33]),
    "unknown dtype": _tensor_entry("w", 1, "float128"),
    "total_bytes 10**15": _set("layout.total_bytes", 10**15),
    "partition_bytes 2**40": _set("partition_bytes", 2**40),
    "chunk_bytes 0": _set("chunk_bytes", 0),
    "chunk_bytes 2**40": _set("chunk_bytes", 2**40),
    "align 3": _set("layout.align", 3),
    # partition records
    "missing partition record": lambda m: m["partitions"].pop(),
    "partition record too short": lambda m: m["partitions"][0].pop(),
    "partition label not in codecs": lambda m: m["partitions"][0].__setitem__(3, "../../../etc"),
    "partition shard out of order": lambda m: m["partitions"][1].__setitem__(4, 7),
    "stored_bytes huge": lambda m: m["partitions"][0].__setitem__(5, 2**50),
    "too few chunk crcs": lambda m: m["partitions"][0][6].clear(),
    "codec label path traversal": lambda m: m.update(
        codecs=dict.fromkeys(["../x"], next(iter(m["codecs"].values()))),
        partitions=[[*p[:3], "../x", *p[4:]] for p in m["partitions"]],
    ),
    # skeleton
    "unknown skeleton name": _set("skeleton.w", {"__tensor__": "nosuch"}),
    "skeleton tuple of an int": _set("skeleton.opt.betas", {"__tuple__": 5}),
    "skeleton npscalar overflow": _set("skeleton.opt.lr", {"__npscalar__": ["|i1", 300]}),
    "skeleton object dtype": _set("skeleton.opt.lr", {"__npscalar__": ["O", 1]}),
    "skeleton unhashable dict key": _set("skeleton.opt", {"__dict__": [[[1, 2], 3]]}),
    "skeleton bad base64": _set("skeleton.opt.lr", {"__bytes__": "!!!"}),
    "ndarray of bfloat16": _set("skeleton.opt.n", {"__ndarray__": "h"}),
    "numpy_names unknown": _set("numpy_names", ["nosuch"]),
    # delta chains
    "delta base is itself": _set("delta_base", 2),
    # nesting
    "user nested 100 deep": _set("user", _deep(100)),
    "skeleton nested 300 deep": _set("skeleton.opt.lr", _deep(300)),
    "NaN total_bytes": _set("layout.total_bytes", float("nan")),
}

RAW_GROUP_FAULTS: dict[str, Callable[[bytes], bytes]] = {
    "user nested 100,000 deep": lambda g: g.replace(
        b'"user":{', b'"user":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b",", 1
    ),
    "not JSON": lambda g: g[: len(g) // 2],
    "Infinity literal": lambda g: g.replace(b'"align":64', b'"align":Infinity', 1),
    "huge integer": lambda g: g.replace(b'"align":64', b'"align":' + b"9" * 5000, 1),
    "not UTF-8": lambda g: b"\xff\xfe" + g,
}

COMMIT_FAULTS: dict[str, Mutation] = {
    "commit is a list": lambda c: [c],
    "commit step is another step": _set("step", 1),
    "commit delta_base disagrees": _set("delta_base", 1),
    "commit delta_base is itself": _set("delta_base", 2),
    "commit arrays_crc32c a list": _set("arrays_crc32c", []),
    "commit raw_bytes disagrees": _set("raw_bytes", 5),
    "commit group_crc32c a string": _set("group_crc32c", "x"),
    "commit with hostile ranks": lambda c: c.update(ranks=10**9, shards_crc32c={}),
    "commit ranks a string": lambda c: c.update(ranks="2", shards_crc32c={"0": 1, "1": 2}),
    "commit format unknown": _set("format", "asymstore/99"),
    "commit world_size a string": _set("world_size", "2"),
    "commit world_size 1": _set("world_size", 1),
    "commit world_size hostile": _set("world_size", 10**9),
}


@pytest.mark.parametrize("fault", sorted(MANIFEST_FAULTS))
def test_manifest_faults(pristine: str, tmp_path: Any, fault: str) -> None:
    root = _copy(pristine, tmp_path)
    if fault == "delta base is itself":  # also the marker, which must agree with the manifest
        rewrite(root, 2, manifest=MANIFEST_FAULTS[fault], commit=_set("delta_base", 2))
    else:
        rewrite(root, 2, manifest=MANIFEST_FAULTS[fault])
    with Bounded():
        assert read_or_refuse(root, 2) == "corrupt"
        assert_falls_back(root, 2, 1)


@pytest.mark.parametrize("fault", sorted(RAW_GROUP_FAULTS))
def test_unparseable_manifests(pristine: str, tmp_path: Any, fault: str) -> None:
    root = _copy(pristine, tmp_path)
    rewrite(root, 2, raw_group=RAW_GROUP_FAULTS[fault])
    with Bounded():
        assert read_or_refuse(root, 2) == "corrupt"
        assert_falls_back(root, 2, 1)


@pytest.mark.parametrize("fault", sorted(COMMIT_FAULTS))
def test_commit_faults(pristine: str, tmp_path: Any, fault: str) -> None:
    root = _copy(pristine, tmp_path)
    rewrite(root, 2, commit=COMMIT_FAULTS[fault])
    with Bounded():
        assert read_or_refuse(root, 2) == "corrupt"
        assert_falls_back(root, 2, 1)


def test_harmless_changes_read_correctly(pristine: str, tmp_path: Any) -> None:
    """What the format calls informational may change: the read is still the saved bytes."""
    root = _copy(pristine, tmp_path)
    rewrite(root, 2, manifest=lambda m: m.update(created=0, user={"note": "x"}, extra_member=[1, 2]))
    assert read_or_refuse(root, 2) == "ok"
    assert cli(["-q", "verify", root, "--all"]) == 0


def _make_delta_of(root: str, step: int, base: int) -> None:
    """Turn full step ``step`` into a (hostile) XOR delta of ``base``: labels, arrays and markers renamed."""
    d = os.path.join(root, step_dir(step))

    def man(m: dict[str, Any]) -> None:
        codecs = {}
        for label, spec in m["codecs"].items():
            spec = dict(spec, delta=True)
            codecs["xor-" + label] = spec
            os.rename(os.path.join(d, label), os.path.join(d, "xor-" + label))
        m["codecs"] = codecs
        m["partitions"] = [[*p[:3], "xor-" + p[3], *p[4:]] for p in m["partitions"]]
        m["delta_base"] = base

    def com(c: dict[str, Any]) -> None:
        c["arrays_crc32c"] = {"xor-" + k: v for k, v in c["arrays_crc32c"].items()}
        c["delta_base"] = base

    rewrite(root, step, manifest=man, commit=com)
    for label in os.listdir(d):  # the arrays' zarr.json checksums are in the marker
        if label.startswith("xor-"):
            with open(os.path.join(d, label, "zarr.json"), "rb") as f:
                meta = f.read()
            rewrite(root, step, commit=lambda c, lb=label, mt=meta: c["arrays_crc32c"].__setitem__(lb, crc32c(mt)))


def test_delta_cycle_is_refused(pristine_delta: str, tmp_path: Any) -> None:
    """Step 0 (the base of 1 and 2) made a delta of step 1: 1 -> 0 -> 1 is a cycle, not a RecursionError."""
    root = _copy(pristine_delta, tmp_path)
    _make_delta_of(root, 0, 1)
    with Bounded():
        assert read_or_refuse(root, 1) == "corrupt"
        assert cli(["-q", "verify", root, "--all"]) == 1
        with Store([root], **_opts()) as s, pytest.raises(CorruptCheckpointError, match=r"cycle|delta"):
            s.restore()


def test_missing_delta_base_is_damage_not_a_usage_error(pristine_delta: str, tmp_path: Any) -> None:
    """A delta whose base is gone: ``verify --all`` reports every step and exits 1 (not 2), restore falls back."""
    root = _copy(pristine_delta, tmp_path)
    os.unlink(os.path.join(root, step_dir(0), "COMMIT"))
    assert cli(["-q", "verify", root, "--all"]) == 1
    with Store([root], **_opts()) as s, pytest.raises(CorruptCheckpointError):
        s.restore()


def test_verify_all_reports_every_step(pristine: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(pristine, tmp_path)
    rewrite(root, 1, manifest=MANIFEST_FAULTS["missing partition record"])
    capsys.readouterr()
    assert cli(["verify", root, "--all"]) == 1
    out = capsys.readouterr().out
    assert "step 1: 1 problem" in out and "step 2: ok" in out and "1 of 2 steps ok" in out


def test_layout_change_of_a_delta_base_is_refused(pristine_delta: str, tmp_path: Any) -> None:
    """A delta's base with another layout (here: a tensor renamed) would XOR against other bytes."""
    root = _copy(pristine_delta, tmp_path)

    def rename(m: dict[str, Any]) -> None:
        _tensor_entry("b", 0, "b2")(m)
        m["skeleton"]["b"] = {"__tensor__": "b2"}

    rewrite(root, 0, manifest=rename)
    assert read_or_refuse(root, 0) == "ok"  # the base itself is consistent
    assert read_or_refuse(root, 1) == "corrupt"


# --- symlinks ------------------------------------------------------------------------------------------------
def test_symlinked_shard_out_of_root_is_refused(pristine: str, tmp_path: Any) -> None:
    root = _copy(pristine, tmp_path)
    other = _copy(pristine, tmp_path)
    d = os.path.join(root, step_dir(2))
    label = next(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x)))
    shard = os.path.join(d, label, "c", "0")
    os.unlink(shard)
    os.symlink(os.path.join(other, step_dir(2), label, "c", "0"), shard)  # the very same bytes, elsewhere
    assert read_or_refuse(root, 2) == "corrupt"
    assert_falls_back(root, 2, 1)


def test_symlinked_step_directory_is_not_read(pristine: str, tmp_path: Any) -> None:
    root = _copy(pristine, tmp_path)
    other = _copy(pristine, tmp_path)
    shutil.rmtree(os.path.join(root, step_dir(2)))
    os.symlink(os.path.join(other, step_dir(2)), os.path.join(root, step_dir(2)))
    with Store([root], **_opts()) as s:
        assert s.steps() == [1]
        s.restore()
        assert s.last_restore is not None and s.last_restore.step == 1
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        open_reader(__import__("asymstore.backends.local", fromlist=["x"]).LocalObjectStore(root), 2)


def test_symlink_inside_the_root_is_followed(pristine: str, tmp_path: Any) -> None:
    root = _copy(pristine, tmp_path)
    d = os.path.join(root, step_dir(2))
    label = next(x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x)))
    shard = os.path.join(d, label, "c", "0")
    os.rename(shard, os.path.join(root, "kept"))
    os.symlink(os.path.join(root, "kept"), shard)
    assert read_or_refuse(root, 2) == "ok"


# --- the fuzzer ----------------------------------------------------------------------------------------------
def _member_paths(v: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _member_paths(x, (*path, k))
    elif isinstance(v, list) and len(v) <= 40:
        for i, x in enumerate(v):
            out += _member_paths(x, (*path, i))
    return out


_HOSTILE = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 63, 64, 4096, 2**31, 2**40, 10**15, 2**64 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
    st.sampled_from(["raw", "zstd3", "float32", "w", "b", "h", "<root>", "../x", "__tensor__", "asymstore/1"]),
    st.lists(st.integers(min_value=-5, max_value=2**33), max_size=6),
    st.dictionaries(
        st.sampled_from(["__tensor__", "__tuple__", "__dict__", "__npscalar__", "a"]), st.integers(), max_size=2
    ),
    st.integers(min_value=1, max_value=400).map(_deep),
)


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    d = doc
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return doc


def _fuzz_case(pristine: str, tmp_path: Any, data: st.DataObject, target: str) -> None:
    root = _copy(pristine, tmp_path)
    gpath, cpath = _paths(root, 2)
    with open(gpath if target == "manifest" else cpath, "rb") as f:
        doc = json.loads(f.read())
    if target == "manifest":
        doc = doc["attributes"]["asymstore"]
    else:
        doc.pop("crc32c")
    paths = _member_paths(doc)
    n = data.draw(st.integers(min_value=1, max_value=3), label="changes")
    for _ in range(n):
        path = data.draw(st.sampled_from(paths), label="member")
        value = data.draw(_HOSTILE, label="value")
        try:
            doc = _replace(copy.deepcopy(doc), path, value)
        except (KeyError, IndexError, TypeError):
            continue
    if target == "manifest":
        rewrite(root, 2, manifest=lambda m: doc)
    else:
        rewrite(
            root, 2, commit=lambda c: doc if not isinstance(doc, dict) else dict(doc, group_crc32c=c["group_crc32c"])
        )
    with Bounded(seconds=20):
        outcome = read_or_refuse(root, 2)
        code = cli(["-q", "verify", root, "--step", "2"])
        assert code == (1 if outcome == "corrupt" else 0)
        assert cli(["ls", root, "--json"]) == 0
    if outcome == "corrupt":
        with Store([root], **_opts()) as s:
            s.restore()
            assert s.last_restore is not None and s.last_restore.step == 1


_FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@_FUZZ
@given(data=st.data())
def test_fuzz_manifests(pristine: str, tmp_path: Any, data: st.DataObject) -> None:
    _fuzz_case(pristine, tmp_path, data, "manifest")


@_FUZZ
@given(data=st.data())
def test_fuzz_commit_markers(pristine: str, tmp_path: Any, data: st.DataObject) -> None:
    _fuzz_case(pristine, tmp_path, data, "commit")


@pytest.mark.slow
@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data(), target=st.sampled_from(["manifest", "commit"]))
def test_fuzz_long(pristine: str, tmp_path: Any, data: st.DataObject, target: str) -> None:
    _fuzz_case(pristine, tmp_path, data, target)


def test_dumps_refuses_what_the_fuzzer_writes() -> None:
    """The writer's own JSON never holds NaN (so a reader may refuse it)."""
    with pytest.raises(ValueError):
        dumps({"x": float("nan")})


# --- multi-rank steps: the global marker -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine_ranks(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Steps 1 and 2 saved by two ranks (one process each in real use; two stores here)."""
    root = str(tmp_path_factory.mktemp("pristine_ranks") / "ck")
    stores = [Store([root], **_opts(rank=r, world_size=2, commit_timeout_s=10)) for r in range(2)]
    try:
        for step in (1, 2):
            for h in [s.save(_state(step), step, blocking=False) for s in stores]:
                h.result(60)
    finally:
        for s in stores:
            s.close()
    return root


def _rewrite_global(root: str, step: int, mutate: Mutation) -> None:
    path = os.path.join(root, step_dir(step), "COMMIT")
    with open(path, "rb") as f:
        body = json.loads(f.read())
    body.pop("crc32c")
    out = mutate(body)
    body = body if out is None else out
    body["crc32c"] = crc32c(json.dumps(body, separators=(",", ":")).encode())
    with open(path, "wb") as f:
        f.write(json.dumps(body, separators=(",", ":")).encode())


GLOBAL_FAULTS: dict[str, Mutation] = {
    "ranks a billion": _set("ranks", 10**9),
    "ranks zero": _set("ranks", 0),
    "ranks a string": _set("ranks", "2"),
    "shards_crc32c missing a rank": lambda c: c.update(shards_crc32c={"0": c["shards_crc32c"]["0"]}),
    "shards_crc32c a list": _set("shards_crc32c", [1, 2]),
    "delta_bases holds the step": _set("delta_bases", [2]),
    "delta_bases a string": _set("delta_bases", "1"),
    "global step is another step": _set("step", 1),
}


@pytest.mark.parametrize("fault", sorted(GLOBAL_FAULTS))
def test_global_marker_faults(pristine_ranks: str, tmp_path: Any, fault: str) -> None:
    from asymstore.backends.local import LocalObjectStore

    root = _copy(pristine_ranks, tmp_path)
    _rewrite_global(root, 2, GLOBAL_FAULTS[fault])
    with Bounded():
        for rank in (0, 1):
            with pytest.raises(CorruptCheckpointError):
                open_reader(LocalObjectStore(root), 2, rank=rank)
        assert cli(["-q", "verify", root, "--all"]) == 1
        assert cli(["ls", root, "--json"]) == 0
        with Store([root], **_opts()) as s:  # another world size reads rank 0's part
            got = s.restore()
            assert s.last_restore is not None and s.last_restore.step == 1
            assert _tensors(got) == _tensors(_state(1))
