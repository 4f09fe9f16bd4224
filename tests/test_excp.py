"""ExCP, the opt-in lossy codec of archive tiers: bounds, recorded errors, lossy restores, refusals."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from asymstore import Store, excp
from asymstore.errors import ConfigError, CorruptCheckpointError
from asymstore.excp import ExcpOptions, nearest, parse_lossy, quantise, quantiser_bound
from asymstore.state import flatten
from asymstore.store import TierSpec
from tests import plain_zarr_reader as plain

STEPS = 4  # checkpoints of the trained state: steps 1..4 after 1..4 real AdamW steps


@pytest.fixture(scope="module")
def trained() -> list[dict[str, Any]]:
    """A tiny GPT-2 (transformers config, nothing downloaded) after 1..STEPS real AdamW steps."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randint(0, 256, (4, 32), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(copy.deepcopy({"model": model.state_dict(), "optim": opt.state_dict()}))
    return out


def _tensors(state: Any) -> dict[str, torch.Tensor]:
    return flatten(state).tensors


# --- the quantiser ---------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.integers(1, 400),
        elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
    ),
    st.integers(1, 255),
)
def test_quantiser_error_is_within_its_bound(values: np.ndarray, levels: int) -> None:
    book, codes = quantise(values, levels)
    assert 1 <= book.size <= levels and codes.shape == values.shape
    assert np.all(np.diff(book) > 0)
    if levels > 1:  # the end levels are the extremes: every value lies between two levels
        assert book[0] == values.min() and book[-1] == values.max()
    err = np.abs(values - book[codes])
    assert err.max() <= quantiser_bound(book) + (values.max() - values.min()) * 0.5 * (levels == 1)
    assert np.array_equal(codes, nearest(book, values))  # the nearest level, as the reader's codes say


def test_quantiser_on_a_sample_whose_extremes_lie_outside_it() -> None:
    # more values than the k-means sample; the extremes (the end levels) are not among the sampled ones
    rng = np.random.default_rng(5)
    v = rng.standard_normal(3 * 65536 + 7)
    v[1] = 40.0
    v[2] = -35.0
    book, codes = quantise(v, 15)
    assert book[0] == -35.0 and book[-1] == 40.0
    assert np.abs(v - book[codes]).max() <= quantiser_bound(book)


def test_quantiser_levels_follow_the_data() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal(100_000)
    book, codes = quantise(v, 15)
    # non-uniform: levels are denser where values are (the middle gap is smaller than the outer ones)
    gaps = np.diff(book)
    assert gaps[len(gaps) // 2] < gaps[0] and gaps[len(gaps) // 2] < gaps[-1]
    assert np.abs(v - book[codes]).max() <= quantiser_bound(book)


def test_options_are_checked() -> None:
    assert parse_lossy(None) is None
    assert parse_lossy("excp") == ExcpOptions()
    assert parse_lossy({"scheme": "excp", "bits": 3}) == ExcpOptions(bits=3)
    for bad in ("zstd", {"scheme": "excp", "colour": 1}, {"scheme": "other"}):
        with pytest.raises(ConfigError):
            parse_lossy(bad)
    for kw in ({"bits": 9}, {"alpha": -1.0}, {"key_every": 17}, {"beta": math.nan}):
        with pytest.raises(ConfigError):
            ExcpOptions(**kw)


# --- refusals: never a default, never where a resume reads first ----------------------------------------
def test_refused_on_the_first_tier_in_memory_and_as_a_default(tmp_path) -> None:
    with pytest.raises(ConfigError, match="first tier"):
        Store([TierSpec(str(tmp_path / "a"), lossy="excp")], host_memory="private")
    with pytest.raises(ConfigError, match="first tier"):
        Store([TierSpec(str(tmp_path / "a"), lossy="excp"), str(tmp_path / "b")], host_memory="private")
    with pytest.raises(ConfigError, match="host-memory"):
        Store([str(tmp_path / "a"), TierSpec("memory://excp-refused", lossy="excp")], host_memory="private")
    with pytest.raises(ConfigError, match="last tier"):
        Store(
            [str(tmp_path / "a"), TierSpec(str(tmp_path / "b"), lossy="excp"), str(tmp_path / "c")],
            host_memory="private",
        )
    with pytest.raises(ConfigError, match="lossy"):
        Store([str(tmp_path / "a")], compression="excp", host_memory="private")
    assert not (tmp_path / "a").exists()  # refused before a tier was opened


# --- a real archive tier ---------------------------------------------------------------------------------
def _archive(tmp_path, **opts: Any) -> tuple[str, str, Store]:
    fast, arch = str(tmp_path / "fast"), str(tmp_path / "archive")
    lossy = ExcpOptions(**opts) if opts else "excp"
    return fast, arch, Store([fast, TierSpec(arch, lossy=lossy)], host_memory="private", host_slots=1)


def test_archive_tier_bound_errors_lossy_restore_and_delta_chain(tmp_path, trained, caplog) -> None:
    fast, arch, s = _archive(tmp_path, key_every=3)
    with s:
        for k, state in enumerate(trained, 1):
            s.save(state, k)
        assert s.flush(60)
        archive = s.tiers[1]
        manifests = {k: archive.reader(k).manifest for k in range(1, STEPS + 1)}
        stored = {k: m.stored_bytes for k, m in manifests.items()}
        # key checkpoints and residuals against the step written before (promotion order may vary): at most
        # two residuals in a row with key_every=3, each against another step of the tier
        bases = {k: manifests[k].delta_base for k in manifests}
        assert sum(b is None for b in bases.values()) >= 1 and sum(b is not None for b in bases.values()) >= 2
        for k, b in bases.items():
            assert b is None or (b in bases and b != k)
            depth = 0
            while b is not None:
                depth, b = depth + 1, bases[b]
            assert depth <= 2, bases
        chained = max(bases, key=lambda k: (bases[k] is not None and bases[bases[k]] is not None, k))
        for m in manifests.values():
            assert m.lossy is not None and m.lossy["scheme"] == "excp"
            errs = m.lossy["errors"]
            assert set(errs) >= {"exp_avg", "exp_avg_sq"}
            for e in errs.values():
                assert e["max_abs"] <= e["bound"] + 1e-300 and e["rel_l2"] >= 0
        for k, m in manifests.items():  # residual weights are lossy, key weights exact
            assert m.lossy is not None and ("weight" in m.lossy["errors"]) == (bases[k] is not None)
        lossless = sum(s.tiers[0].reader(k).manifest.stored_bytes for k in range(1, STEPS + 1))
        assert sum(stored.values()) < 0.5 * lossless, (stored, lossless)
    # a fresh store: host memory is empty; the fast tier's lossless copy wins where it is there
    with Store([fast, TierSpec(arch, lossy="excp")], host_memory="private") as s2:
        got = s2.restore(STEPS)
        assert s2.last_restore is not None and not s2.last_restore.lossy
        assert s2.last_restore.tier == s2.tiers[0].name
        for k in range(1, STEPS + 1):
            s2.tiers[0].delete(k)  # only the archive's copies are left
    with Store([fast, TierSpec(arch, lossy="excp")], host_memory="private") as s3:
        for k in sorted({chained, *(k for k, b in bases.items() if b is not None)}):  # through their chains
            with caplog.at_level(logging.WARNING, logger="asymstore"):
                got = s3.restore(k)
            rep = s3.last_restore
            assert rep is not None and rep.lossy and rep.tier == s3.tiers[1].name
            assert "lossy" in rep.detail and "LOSSY" in caplog.text
            m = manifests[k]
            assert m.lossy is not None
            names = [t[0] for t in m.lossy["layout"]["tensors"]]
            want, have = _tensors(trained[k - 1]), _tensors(got)
            assert set(want) == set(have)
            for name, rec in zip(names, m.lossy["tensors"], strict=True):
                mode, _cls, bound, _pruned, max_abs, _rel = rec
                w, h = want[name], have[name]
                assert h.dtype == w.dtype and h.shape == w.shape
                err = float((w.double() - h.double()).abs().max()) if w.numel() else 0.0
                if mode == "copy":
                    assert torch.equal(w, h), name
                else:
                    assert err <= bound, (name, err, bound)  # the stated bound holds after a restore
                    assert err == pytest.approx(max_abs, rel=1e-9, abs=1e-300)  # and what was recorded is it
        lazy = s3.open_checkpoint(3)
        name = next(n for n in lazy if n.endswith("exp_avg"))
        assert torch.equal(lazy[name].read(), _tensors(s3.restore(3))[name])


def test_plain_zarr_reads_the_bytes_and_rebuilds_by_the_spec(tmp_path, trained) -> None:
    """The lossy stage is ordinary zarr arrays: rebuilt with zarr-python + numpy following docs/format.md 15."""
    fast, arch, s = _archive(tmp_path, key_every=4)
    with s:
        for k, state in enumerate(trained[:2], 1):
            s.save(state, k)
        assert s.flush(60)

    def rebuild(step: int) -> dict[str, np.ndarray]:
        m = plain.manifest(arch, step)
        lossy, enc = m["lossy"], plain.read_tensors(arch, step)
        base = rebuild(lossy["base"]) if lossy["base"] is not None else None
        out = {}
        for i, (t, rec) in enumerate(zip(lossy["layout"]["tensors"], lossy["tensors"], strict=True)):
            name, dtype, shape = t[0], t[1], t[2]
            if rec[0] == "copy":
                out[name] = enc[f"excp/{i}/copy"]
                continue
            values = enc[f"excp/{i}/codebook"].astype(np.float64)[enc[f"excp/{i}/codes"]]
            if rec[0] == "residual":
                assert base is not None
                prev = torch.from_numpy(base[name].copy())
                prev = prev.view(torch.bfloat16) if dtype == "bfloat16" else prev
                values = prev.double().reshape(-1).numpy() + values
            cast = torch.from_numpy(values).to(getattr(torch, dtype)).reshape(shape)
            out[name] = (cast.view(torch.int16) if dtype == "bfloat16" else cast).numpy()
        return out

    plain_state = rebuild(2)
    # a manifest whose lossy member does not describe its stream is refused with a clear error, never decoded
    with Store([fast, TierSpec(arch, lossy="excp")], host_memory="private") as s1:
        reader = s1.tiers[1].reader(2)
        stored = bytearray(reader.manifest.layout.total_bytes)
        reader.read_all_into(memoryview(stored))
        for damage in ("mode", "base", "layout", "codes"):
            m = copy.deepcopy(reader.manifest)
            assert m.lossy is not None
            if damage == "mode":
                m.lossy["tensors"][0][0] = "bogus"
            elif damage == "base":
                m.lossy["base"] = 7
            elif damage == "layout":
                m.lossy["layout"]["tensors"][0][3] = 3
            else:  # a code past its codebook
                i = next(i for i, r in enumerate(m.lossy["tensors"]) if r[0] != "copy")
                e = m.layout.by_name()[f"excp/{i}/codes"]
                bad = bytearray(stored)
                bad[e.offset] = 255
                with pytest.raises(CorruptCheckpointError, match="codebook"):
                    excp.decode(m, bad, stored, "x")
                continue
            with pytest.raises(CorruptCheckpointError):
                excp.decode(m, stored, stored, "x")
    with Store([fast, TierSpec(arch, lossy="excp")], host_memory="private") as s2:
        s2.tiers[0].delete(2)
        got = _tensors(s2.restore(2))
    for name, t in got.items():
        assert np.array_equal(plain_state[name].reshape(-1).view(np.uint8), t.reshape(-1).view(torch.uint8).numpy())
