"""What a save, a restore and a store are asked to do is checked up front, with errors that name the key and
the fix, before a byte is written: step numbers, user metadata, values the format cannot hold, options (of the
store, the DCP writer, HDFS URLs), and aliases that differ only in their conjugate/negative bits."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import pytest
import torch

from asymstore import Store, TierSpec, open_store
from asymstore.cli import main as cli
from asymstore.config import Config
from asymstore.errors import ConfigError, StateMismatchError, UnsupportedValueError

#: host slots in this process's memory where the store offers shared ones too
_PRIVATE = {"host_memory": "private"} if "host_memory" in {f.name for f in dataclasses.fields(Config)} else {}


def _opts(**kw: Any) -> dict[str, Any]:
    return {**_PRIVATE, "background_idle": False, **kw}


def _written(root: str) -> list[str]:
    """Step directories and probe leftovers under ``root`` (what a refused save must not leave)."""
    return sorted(n for n in os.listdir(root) if n.startswith("step_")) if os.path.isdir(root) else []


# --- aliases and view bits -----------------------------------------------------------------------------------
def _views() -> dict[str, Any]:
    x = torch.randn(5, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    r = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    return {
        "x": x,
        "x_conj": x.conj(),
        "x_neg": torch._neg_view(x),
        "x_conj_neg": torch._neg_view(x.conj()),
        "r": r,
        "r_neg": torch._neg_view(r),
        "tied": x,  # a real alias: stored once, restored as one tensor
    }


def test_conj_and_neg_views_restore_their_own_values(tmp_path: Any) -> None:
    state = _views()
    with Store([str(tmp_path / "ck")], **_opts()) as s:
        s.save(state, 1)
        for got in (s.restore(), s.open_checkpoint().load()):
            for k, v in state.items():
                want = v.resolve_conj().resolve_neg()
                assert torch.equal(got[k], want), k
                assert not got[k].is_conj() and not got[k].is_neg()
            assert got["tied"] is got["x"]
            assert got["x_conj"] is not got["x"] and got["x_neg"] is not got["x"]


def test_conj_and_neg_views_restore_in_place(tmp_path: Any) -> None:
    state = _views()
    with Store([str(tmp_path / "ck")], **_opts()) as s:
        s.save(state, 1)
        into = {k: torch.zeros_like(v.resolve_conj().resolve_neg()) for k, v in state.items() if k != "tied"}
        s.restore(into=into)
        for k, v in into.items():
            assert torch.equal(v, state[k].resolve_conj().resolve_neg()), k


# --- values the format cannot hold ---------------------------------------------------------------------------
def _circular() -> dict[str, Any]:
    d: dict[str, Any] = {"w": torch.ones(2)}
    d["self"] = {"again": [d]}
    return d


def _deep(n: int) -> Any:
    v: Any = torch.ones(1)
    for _ in range(n):
        v = [v]
    return {"deep": v}


BAD_VALUES: dict[str, tuple[Any, str]] = {
    "meta tensor": ({"model": {"w": torch.empty(3, device="meta")}}, r"model/w: a meta tensor .*to_empty"),
    "nested tensor": (
        {"nt": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])},
        r"nt: nested tensors .*unbind",
    ),
    "datetime64 array": ({"t": np.array(["2024-01-01"], dtype="datetime64[D]")}, r"t: numpy datetime64.*astype"),
    "str array": ({"s": np.array(["a", "bc"])}, r"s: numpy <U2 .*tolist"),
    "object array": ({"o": np.array([1, "x"], dtype=object)}, r"o: numpy object arrays.*tolist"),
    "big-endian array": ({"be": np.arange(3, dtype=">i4")}, r"be: .*byte order"),
    "circular reference": (_circular(), r"self/again/0: circular reference"),
    "nested too deeply": (_deep(80), r"nested more than 64 levels"),
    "a set": ({"s": {1, 2}}, r"s: values of type builtins.set"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_unsupported_values_are_named_and_nothing_is_written(tmp_path: Any, case: str) -> None:
    value, pattern = BAD_VALUES[case]
    root = str(tmp_path / "ck")
    with Store([root], **_opts()) as s:
        with pytest.raises(UnsupportedValueError, match=pattern):
            s.save(value, 1)
        assert s.steps() == []
    assert _written(root) == []


def test_restore_into_meta_tensors_is_refused(tmp_path: Any) -> None:
    with Store([str(tmp_path / "ck")], **_opts()) as s:
        s.save({"w": torch.ones(3)}, 1)
        with pytest.raises(UnsupportedValueError, match=r"w: a meta tensor"):
            s.restore(into={"w": torch.empty(3, device="meta")})


def test_strict_false_mismatch_does_not_suggest_strict_false(tmp_path: Any) -> None:
    with Store([str(tmp_path / "ck")], **_opts()) as s:
        s.save({"w": torch.ones(3), "b": torch.ones(2)}, 1)
        with pytest.raises(StateMismatchError) as strict:
            s.restore(into={"w": torch.ones(4)})
        assert "pass strict=False" in str(strict.value)
        with pytest.raises(StateMismatchError) as loose:
            s.restore(into={"w": torch.ones(4)}, strict=False)
        msg = str(loose.value)
        assert "w: target torch.float32 (4,)" in msg and "pass strict=False" not in msg and "shape or dtype" in msg


# --- step numbers and user metadata, up front ----------------------------------------------------------------
@pytest.mark.parametrize(
    "step, want",
    [(np.int64(900), 900), (torch.tensor(901), 901), (np.uint8(7), 7), (5, 5), (torch.tensor(3, dtype=torch.int16), 3)],
)
def test_int_like_steps_become_plain_ints(tmp_path: Any, step: Any, want: int) -> None:
    with Store([str(tmp_path / "ck")], **_opts()) as s:
        h = s.save({"w": torch.ones(2)}, step)
        assert h.step == want and type(h.step) is int
        assert s.steps() == [want] and type(s.steps()[0]) is int
    with Store([str(tmp_path / "ck")], **_opts()) as s:
        assert s.steps() == [want]


@pytest.mark.parametrize(
    "step, pattern",
    [
        (True, "bool"),
        (np.bool_(True), "bool"),
        (-1, r"\[0, 10\^12\)"),
        (10**12, r"\[0, 10\^12\)"),
        (3.5, "float"),
        (7.0, "int\\(step\\)"),
        ("7", "str"),
        (None, "NoneType"),
        (torch.tensor([1, 2]), "shape"),
        (torch.tensor(2.0), "float"),
    ],
)
def test_bad_steps_are_refused_before_anything_is_written(tmp_path: Any, step: Any, pattern: str) -> None:
    root = str(tmp_path / "ck")
    with Store([root], **_opts()) as s:
        with pytest.raises(ConfigError, match=pattern):
            s.save({"w": torch.ones(2)}, step)
        assert s.steps() == []
    assert _written(root) == []


@pytest.mark.parametrize(
    "user, pattern",
    [
        ({"loss": float("nan")}, r"user\['loss'\] is nan"),
        ({"a": {"b": [1.0, float("inf")]}}, r"user\['a'\]\['b'\]\[1\] is inf"),
        ({"x": object()}, r"user\['x'\]: builtins.object"),
        ({1: "x"}, "key 1 is not a string"),
        ({"t": torch.ones(2)}, r"user\['t'\]: a tensor of shape \(2,\)"),
        ({"c": np.complex64(1j)}, r"complex64"),
        ([("a", 1)], "must be a dict"),
    ],
)
def test_bad_user_metadata_is_refused_before_anything_is_written(tmp_path: Any, user: Any, pattern: str) -> None:
    root = str(tmp_path / "ck")
    with Store([root], **_opts()) as s:
        with pytest.raises(UnsupportedValueError, match=pattern):
            s.save({"w": torch.ones(2)}, 1, user=user)
        assert s.steps() == []
    assert _written(root) == []


def test_numpy_and_torch_scalars_in_user_metadata_are_converted(tmp_path: Any) -> None:
    user = {"loss": np.float32(0.5), "n": np.int64(3), "ok": np.bool_(True), "t": torch.tensor(2.5), "l": [np.int8(1)]}
    with Store([str(tmp_path / "ck")], **_opts()) as s:
        s.save({"w": torch.ones(2)}, 1, user=user)
        got = s.open_checkpoint(1).user
    assert got == {"loss": 0.5, "n": 3, "ok": True, "t": 2.5, "l": [1]}
    assert [type(got[k]) for k in ("loss", "n", "ok", "t")] == [float, int, bool, float]


# --- options -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, pattern",
    [
        ({"compression": "gzip"}, r"unknown compression 'gzip'; use 'auto', 'none' or one of"),
        ({"host_slots": "2"}, "host_slots must be int"),
        ({"non_fatal": "yes"}, "non_fatal must be bool"),
        ({"chunk_bytes": 2**31}, "chunk_bytes must be a power of two"),
        ({"commit_timeout_s": float("inf")}, "commit_timeout_s must be float"),
        ({"backend_options": {"hdfs": 3}}, "backend_options"),
        ({"partition_bytes": 4096 * 2**21, "chunk_bytes": 4096}, "at most"),
    ],
)
def test_bad_options_fail_at_construction(tmp_path: Any, options: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        Config(**options)
    with pytest.raises(ConfigError, match=pattern):
        open_store(str(tmp_path / "ck"), **_opts(**options))


def test_open_store_keep_applies_to_the_first_tier(tmp_path: Any) -> None:
    root = str(tmp_path / "ck")
    with open_store(root, keep=2, **_opts()) as s:
        for step in range(4):
            s.save({"w": torch.full((3,), float(step))}, step)
        assert s.steps() == [2, 3]
    with pytest.raises(ConfigError, match="TierSpec"):
        open_store([TierSpec(root, keep=3)], keep=2, **_opts())


def test_dcp_writer_options_are_checked_at_construction(tmp_path: Any) -> None:
    from asymstore.trainer_hooks.dcp import AsymStorageReader, AsymStorageWriter

    root = str(tmp_path / "ck")
    w = AsymStorageWriter(root, thread_count=4, sync_files=True, single_file_per_rank=False, overwrite=False)
    w.close()
    nosync = AsymStorageWriter(root, sync_files=False)
    assert nosync._owner.options["backend_options"]["file"]["fsync"] is False
    for bad, pattern in (
        ({"overwrite": True}, "never replaces a committed step"),
        ({"thread_count": 0}, "thread_count must be an integer >= 1"),
        ({"sync_files": "no"}, "sync_files must be True or False"),
        ({"cache_staged_state_dict": True}, "host slots"),
        ({"compression": "gzip"}, "unknown compression"),
        ({"no_such_option": 1}, "unknown option"),
    ):
        with pytest.raises(ConfigError, match=pattern):
            AsymStorageWriter(root, **bad)
    with pytest.raises(ConfigError, match="unknown option"):
        AsymStorageReader(root, thread_count=2)


@pytest.mark.parametrize(
    "url, pattern",
    [
        ("hdfs://127.0.0.1/x", r"has no port: write hdfs://127.0.0.1:8020/x"),
        ("hdfs://localhost/x", "has no port"),
        ("hdfs://127.0.0.1:99999/x", r"port must be in 1..65535.*'99999'"),
        ("hdfs://nn:0/x", "port must be in 1..65535"),
        ("hdfs://nn:http/x", "port must be in 1..65535"),
        ("hdfs:///x", "must look like hdfs://host:port/path"),
    ],
)
def test_hdfs_urls_are_checked_before_connecting(url: str, pattern: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from asymstore.backends.hdfs import check_url

    monkeypatch.delenv("HADOOP_CONF_DIR", raising=False)
    with pytest.raises(ConfigError, match=pattern):
        check_url(url, {})


def test_hdfs_nameservice_without_port_is_accepted() -> None:
    from asymstore.backends.hdfs import check_url

    assert check_url("hdfs://ns1/ck", {"dfs.ha.namenodes.ns1": "nn1,nn2"}).hostname == "ns1"


# --- export --------------------------------------------------------------------------------------------------
EXPORT_STATES: dict[str, dict[str, Any]] = {
    "plain": {
        "w": torch.randn(4, 3),
        "b": torch.arange(5, dtype=torch.int64),
        "h": torch.ones(3, dtype=torch.bfloat16),
    },
    "odd names": {"a/b": torch.ones(2), "50%": torch.zeros(3), "": torch.ones(1), "é": torch.ones(2, dtype=torch.int8)},
    "reserved name": {"__metadata__": torch.ones(2), "w": torch.ones(3)},
}


@pytest.mark.parametrize("case", sorted(EXPORT_STATES))
def test_export_is_readable_by_safetensors_or_refused(tmp_path: Any, case: str) -> None:
    from safetensors import safe_open

    state = EXPORT_STATES[case]
    root, out = str(tmp_path / "ck"), str(tmp_path / "out.safetensors")
    with Store([root], **_opts()) as s:
        s.save(state, 1)
        names = list(s.open_checkpoint(1))
    code = cli(["-q", "export", root, out])
    if "__metadata__" in names:
        assert code == 1 and not os.path.exists(out)
        assert cli(["-q", "export", root, out, "--rename", "__metadata__=metadata_tensor"]) == 0
        renamed = {"__metadata__": "metadata_tensor"}
    else:
        assert code == 0
        renamed = {}
    # exported under the state's own keys, not the stored names (escaped; the key "" is stored as "<root>")
    real = {"a%2Fb": "a/b", "50%25": "50%", "<root>": ""}
    with safe_open(out, framework="pt") as f:
        keys = set(f.keys())
        assert keys == {renamed.get(n, real.get(n, n)) for n in names}
        with Store([root], **_opts()) as s:
            ck = s.open_checkpoint(1)
            for n in names:
                assert torch.equal(f.get_tensor(renamed.get(n, real.get(n, n))), ck[n].read()), n


def test_export_rename_errors(tmp_path: Any) -> None:
    root, out = str(tmp_path / "ck"), str(tmp_path / "out.safetensors")
    with Store([root], **_opts()) as s:
        s.save({"a": torch.ones(1), "b": torch.ones(1)}, 1)
    assert cli(["-q", "export", root, out, "--rename", "a=b"]) == 1
    assert cli(["-q", "export", root, out, "--rename", "nosuch=x"]) == 1
    assert cli(["-q", "export", root, out, "--rename", "a"]) == 1
    assert cli(["-q", "export", root, out, "--rename", "a=__metadata__"]) == 1
    assert not os.path.exists(out)


def test_the_deepest_state_a_save_takes_reads_back_everywhere(tmp_path: Any) -> None:
    """The writer's depth limit fits the reader's: the deepest state a save accepts (non-string-key dicts and
    tuples, the JSON-heaviest forms) restores, loads lazily, and ``show``/``ls``/``verify``/``export`` answer."""
    v: Any = torch.arange(3.0)
    for i in range(63):
        v = {i: v} if i % 2 else (v, i)
    state = {"deep": v}
    root = str(tmp_path / "ck")
    with Store([root], **_opts()) as s:
        s.save(state, 1, user={"u": _nested_json(64)})
        with pytest.raises(UnsupportedValueError, match="nested more than 64"):
            s.save(state, 2, user={"u": _nested_json(65)})
        got = s.restore()
        lazy = s.open_checkpoint(1).load()
    for tree in (got, lazy):
        leaf = tree["deep"]
        for i in reversed(range(63)):
            leaf = leaf[i] if i % 2 else leaf[0]
        assert torch.equal(leaf, torch.arange(3.0))
    for args in (["show", root], ["show", root, "--json"], ["ls", root], ["verify", root, "--all"]):
        assert cli(["-q", *args]) == 0, args
    assert cli(["-q", "export", root, str(tmp_path / "x.safetensors")]) == 0


def _nested_json(n: int) -> Any:
    v: Any = [1]
    for _ in range(n - 1):
        v = {"a": v}
    return v


def test_open_checkpoint_takes_int_like_steps(tmp_path: Any) -> None:
    from asymstore import open_checkpoint

    root = str(tmp_path / "ck")
    with Store([root], **_opts()) as s:
        s.save({"w": torch.ones(2)}, 4)
    assert open_checkpoint(root, np.int64(4)).step == 4
    with pytest.raises(ConfigError, match="bool"):
        open_checkpoint(root, True)


@pytest.mark.parametrize(
    "doc", [{"state_dict_metadata": 5}, {"state_dict_metadata": {"a": [1]}}, {"planner_data": None}, [1, 2]]
)
def test_malformed_dcp_metadata_is_a_corrupt_checkpoint(tmp_path: Any, doc: Any) -> None:
    from asymstore.errors import CorruptCheckpointError
    from asymstore.trainer_hooks.dcp import FORMAT, AsymStorageReader

    doc = dict(doc, format=FORMAT) if isinstance(doc, dict) else doc

    root = str(tmp_path / "ck")
    with Store([root], **_opts()) as s:
        s.save({"w": torch.ones(2)}, 1, user={"dcp": doc})
    reader = AsymStorageReader(root, step=1, **_PRIVATE)
    try:
        with pytest.raises(CorruptCheckpointError, match=r"DCP metadata .* malformed"):
            reader.read_metadata()
    finally:
        reader._owner.close()


def test_autograd_zero_tensors_are_stored_as_zeros_not_aliased(tmp_path: Any) -> None:
    """Zero tensors of autograd have no storage (no data pointer to compare): each is stored as its zeros."""
    state = {"a": torch._efficientzerotensor(3), "b": torch._efficientzerotensor(3), "c": torch.ones(2)}
    with Store([str(tmp_path / "ck")], **_opts()) as s:
        s.save(state, 1)
        got = s.restore()
    assert torch.equal(got["a"], torch.zeros(3)) and torch.equal(got["b"], torch.zeros(3))
    assert got["a"] is not got["b"] and not got["a"]._is_zerotensor()


@pytest.mark.filterwarnings("ignore")
def test_dcp_save_with_filesystem_writer_options(tmp_path: Any) -> None:
    """DCP's own FileSystemWriter options that make sense are accepted and the save round-trips."""
    import torch.distributed.checkpoint as dcp

    from asymstore.trainer_hooks.dcp import AsymStorageReader, AsymStorageWriter

    root = str(tmp_path / "ck")
    state = {"w": torch.randn(10, 10), "b": torch.arange(5)}
    w = AsymStorageWriter(
        root, step=3, thread_count=4, sync_files=False, single_file_per_rank=True, overwrite=False, **_PRIVATE
    )
    try:
        dcp.save(state, storage_writer=w, no_dist=True)
    finally:
        w.close()
    got = {"w": torch.zeros(10, 10), "b": torch.zeros(5, dtype=torch.int64)}
    r = AsymStorageReader(root, step=3, **_PRIVATE)
    try:
        dcp.load(got, storage_reader=r, no_dist=True)
    finally:
        r._owner.close()
    assert torch.equal(got["w"], state["w"]) and torch.equal(got["b"], state["b"])
