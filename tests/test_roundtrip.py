"""Property tests: any supported state round-trips bit-exactly through Store.save/restore on a local tier."""

from __future__ import annotations

import math
import tempfile
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asymstore
from asymstore import Store, UnsupportedValueError
from asymstore.dtypes import supported_dtypes

from .helpers import assert_bitequal, random_tensor, tensor_bytes

SMALL = dict(chunk_bytes=4096, partition_bytes=16384)
COMPRESSIONS = ["none", "zstd3", "lz4", "blosc-shuffle", "xor-zstd"]
DTYPES = supported_dtypes()
NP_DTYPES = ["<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "<u2", "<u4", "<u8", "|b1", "<c8", "<c16"]

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

warnings.filterwarnings("ignore", message=".*ComplexHalf.*")


# --- strategies ------------------------------------------------------------------
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)


@st.composite
def tensors(draw, big: bool = False) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    if big:  # spans several chunks/partitions
        shape: tuple[int, ...] = (draw(st.integers(1, 2500)), 11)
    else:
        shape = draw(shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    t = random_tensor(dtype, shape, seed)
    layout = draw(st.sampled_from(["contig", "transpose", "stride", "offset"]))
    if layout == "transpose" and t.dim() >= 2:
        t = t.transpose(0, 1)  # non-contiguous view
    elif layout == "stride" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[::2]
    elif layout == "offset" and t.numel() > 1:
        t = t.reshape(-1)[1:]  # a view with a storage offset
    return t


@st.composite
def ndarrays(draw) -> np.ndarray:
    dt = np.dtype(draw(st.sampled_from(NP_DTYPES)))
    shape = draw(shapes)
    n = math.prod(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if dt.kind == "b":
        a = rng.integers(0, 2, n).astype(bool).reshape(shape)
    else:
        a = np.frombuffer(rng.bytes(n * dt.itemsize), dtype=dt).reshape(shape).copy()
    if a.ndim >= 2 and draw(st.booleans()):
        a = a.T  # non-contiguous
    return a


finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
np_scalars = st.one_of(
    finite_or_not.map(np.float64),
    finite_or_not.map(np.float32),
    st.floats(width=16, allow_nan=True).map(np.float16),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.integers(-128, 127).map(np.int8),
    st.booleans().map(np.bool_),
    st.tuples(finite_or_not, finite_or_not).map(lambda p: np.complex128(complex(*p))),
    st.text(max_size=5).map(np.str_),
)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    finite_or_not,
    st.text(max_size=8),
    st.binary(max_size=16),
    np_scalars,
)
keys = st.one_of(
    st.text(max_size=6),
    st.integers(-5, 5),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.tuples(st.integers(0, 3), st.text(max_size=2)),
)


def containers(children):
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    )


states = st.recursive(st.one_of(json_leaves, tensors(), ndarrays()), containers, max_leaves=12)


@st.composite
def full_states(draw):
    """A nested state plus one large tensor so several partitions are written."""
    return {"nested": draw(states), "big": draw(tensors(big=True)), "t": draw(tensors())}


def _round_trip(state, **kw):
    with tempfile.TemporaryDirectory() as d:
        with Store([d], **SMALL, **kw) as store:
            try:
                store.save(state, step=1)
            except UnsupportedValueError as e:
                # the only accepted refusal: two distinct keys that print the same (e.g. 1 and "1")
                assert "map to the tensor name" in str(e), e
                return
            got = store.restore(1)
            assert store.last_restore is not None and store.last_restore.tier == "host"
        assert_bitequal(got, state)
        # a fresh store reads the persisted copy, not host memory
        with Store([d], **SMALL, **kw) as fresh:
            got2 = fresh.restore()
            assert fresh.last_restore is not None and fresh.last_restore.tier == "file"
        assert_bitequal(got2, state)


# --- properties --------------------------------------------------------------------
@pytest.mark.parametrize("compression", COMPRESSIONS)
@SETTINGS
@given(state=full_states())
def test_round_trip_bit_exact(compression: str, state) -> None:
    _round_trip(state, compression=compression)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_every_shape_kind(dtype: torch.dtype, tmp_path) -> None:
    """Each supported dtype as 0-d, empty, non-contiguous and multi-partition tensors."""
    base = random_tensor(dtype, (40, 700 // max(1, torch.empty((), dtype=dtype).element_size())), 7)
    state = {
        "scalar": random_tensor(dtype, (), 1),
        "empty": random_tensor(dtype, (0, 3), 2),
        "empty1": random_tensor(dtype, (0,), 2),
        "noncontig": base.t(),
        "strided": base[::3, 1::2],
        "big": random_tensor(dtype, (9000,), 3),
    }
    with Store([str(tmp_path)], **SMALL, compression="zstd3") as store:
        store.save(state, 1)
    with Store([str(tmp_path)], **SMALL) as fresh:
        got = fresh.restore(1)
    assert_bitequal(got, state)
    for k in ("noncontig", "strided"):
        assert got[k].is_contiguous()


@SETTINGS
@given(seeds=st.lists(st.integers(0, 2**31 - 1), min_size=4, max_size=7), data=st.data())
def test_xor_delta_chain(seeds, data) -> None:
    """delta_every=3: full bases and XOR deltas alternate; every step restores bit-exactly from disk."""
    dtype = data.draw(
        st.sampled_from(
            [
                torch.float32,
                torch.bfloat16,
                torch.float64,
                torch.int8,
                torch.float8_e4m3fn if hasattr(torch, "float8_e4m3fn") else torch.float16,
            ]
        )
    )
    n = data.draw(st.integers(1000, 12000))
    w0 = random_tensor(dtype, (n,), seeds[0])
    states = []
    cur = w0.clone()
    for i, s in enumerate(seeds):
        # small sparse changes (what deltas are for), plus a fresh small tensor
        idx = torch.randint(0, n, (max(1, n // 50),), generator=torch.Generator().manual_seed(s))
        cur = cur.clone()
        cur.view(torch.uint8).view(-1)[idx] ^= 0x5A
        states.append({"w": cur, "i": i, "aux": random_tensor(torch.float32, (17,), s)})
    with tempfile.TemporaryDirectory() as d:
        with Store([d], **SMALL, delta_every=3, compression="xor-zstd", host_slots=1) as store:
            for step, st_ in enumerate(states):
                store.save(st_, step)
        with Store([d], **SMALL) as fresh:
            tier = fresh.tiers[0]
            bases = [tier.commit_info(s).get("delta_base") for s in range(len(states))]
            assert bases[:4] == [None, 0, 0, None]  # K=3: base, delta, delta, base ...
            for step, st_ in enumerate(states):
                assert_bitequal(fresh.restore(step), st_, f"step {step}")
                assert fresh.last_restore is not None and fresh.last_restore.tier == "file"


# --- aliasing, in-place restore, errors -------------------------------------------------
def test_tied_tensors_restore_shared(tmp_path) -> None:
    w = torch.randn(64, 8)
    state = {"enc": {"w": w}, "dec": {"w": w}, "view": w[1], "other": w.clone()}
    with Store([str(tmp_path)], **SMALL) as store:
        store.save(state, 1)
        lay = store.host.find(1).layout
        assert [t.name for t in lay.tensors] == ["enc/w", "view", "other"]  # stored once
    with Store([str(tmp_path)], **SMALL) as fresh:
        got = fresh.restore(1)
    assert got["enc"]["w"] is got["dec"]["w"]
    assert got["other"] is not got["enc"]["w"]
    assert_bitequal(got, state)


def test_restore_into_fills_existing_tensors(tmp_path) -> None:
    src = {"a": torch.randn(10, 3), "b": [torch.arange(7), {"c": torch.ones(2, dtype=torch.bfloat16)}], "n": 3}
    with Store([str(tmp_path)], **SMALL) as store:
        store.save(src, 1)
    target = {
        "a": torch.zeros(10, 3),
        "b": [torch.zeros(7, dtype=torch.int64), {"c": torch.zeros(2, dtype=torch.bfloat16)}],
        "n": 0,
    }
    ptrs = [target["a"].data_ptr(), target["b"][0].data_ptr(), target["b"][1]["c"].data_ptr()]
    with Store([str(tmp_path)], **SMALL) as fresh:
        out = fresh.restore(1, into=target)
    assert_bitequal(target["a"], src["a"])
    assert_bitequal(target["b"][0], src["b"][0])
    assert_bitequal(target["b"][1]["c"], src["b"][1]["c"])
    # the returned state's tensors are the targets' memory (views of the same storage)
    assert out["a"].data_ptr() == target["a"].data_ptr()
    assert out["b"][1]["c"].data_ptr() == target["b"][1]["c"].data_ptr()
    assert [target["a"].data_ptr(), target["b"][0].data_ptr(), target["b"][1]["c"].data_ptr()] == ptrs
    assert out["n"] == 3


def test_restore_into_module_params(tmp_path) -> None:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.LayerNorm(30))
    with Store([str(tmp_path)], **SMALL) as store:
        store.save({"model": m.state_dict()}, 1)
    m2 = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.LayerNorm(30))
    with Store([str(tmp_path)], **SMALL) as fresh:
        fresh.restore(1, into={"model": m2.state_dict()})
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert tensor_bytes(a) == tensor_bytes(b), k


class _Opaque:
    pass


@pytest.mark.parametrize(
    "value, path",
    [
        ({"opt": {"state": [1, _Opaque()]}}, "opt/state/1"),
        ({"a": {"b": {1, 2}}}, "a/b"),
        ({"x": (1, lambda: 0)}, "x/1"),
        ({"sp": torch.eye(3).to_sparse()}, "sp"),
        ({"obj": np.array([object()], dtype=object)}, "obj"),
        ({"c": 1 + 2j}, "c"),
        ({"k": {object(): 1}}, "k"),
        ({"np": np.datetime64("2020-01-01")}, "np"),
    ],
)
def test_unsupported_values_name_the_path(tmp_path, value, path) -> None:
    with Store([str(tmp_path)], **SMALL) as store:
        with pytest.raises(UnsupportedValueError) as ei:
            store.save(value, 1)
        assert path in str(ei.value)
        assert store.steps() == []
        store.save({"ok": torch.ones(1)}, 2)  # the store is still usable
        assert store.steps() == [2]


def test_state_without_tensors(tmp_path) -> None:
    state = {"epoch": 3, "lr": [0.1, float("inf")], "name": "run", "b": b"\x00\xff"}
    with Store([str(tmp_path)], **SMALL) as store:
        store.save(state, 5)
    with Store([str(tmp_path)], **SMALL) as fresh:
        assert_bitequal(fresh.restore(5), state)


def test_public_names_exported() -> None:
    for name in asymstore.__all__:
        assert hasattr(asymstore, name), name
