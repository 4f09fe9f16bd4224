"""The benchmarks run end to end in their quick modes and write a results table with ratios.

Smoke runs only (tiny sizes, one round): they check that each script works from a checkout as
``python -m benchmarks.NAME`` and writes its markdown and JSON, not what it measures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_GPT2 = ["--layers", "1", "--batch", "2", "--seq", "32", "--embd", "64", "--heads", "2", "--vocab", "1000"]


def _run(module: str, args: list[str]) -> str:
    r = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_bench_hostcopy_quick(tmp_path: Path) -> None:
    out = tmp_path / "hostcopy.md"
    _run("bench_hostcopy", ["--quick", "--out", str(out)])
    md = out.read_text()
    assert "memmove" in md and "x" in md, md
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["machine"] and data["date"]


@pytest.mark.slow
def test_bench_overhead_quick(tmp_path: Path) -> None:
    _run("bench_overhead", ["--quick", *TINY_GPT2, "--out", str(tmp_path)])
    md = (tmp_path / "overhead.md").read_text()
    for variant in ("baseline", "asym", "dcp.async_save"):
        assert f"| {variant} " in md or f"| `{variant}`" in md, md[:2000]
    assert "%" in md  # overheads against the baseline of the same run


@pytest.mark.slow
def test_bench_overhead_heavy_regime_reports_its_goals(tmp_path: Path) -> None:
    _run("bench_overhead", ["--quick", "--regime", "heavy", *TINY_GPT2, "--out", str(tmp_path)])
    md = (tmp_path / "overhead_heavy.md").read_text()
    assert "heavy-copy regime" in md
    for goal in ("0.5 x checkfreq's", "0.5 x uniform's", "within noise of private slots"):
        assert goal in md, md[:3000]
    assert "of a baseline iteration" in md  # the measured copy share of an iteration
    # and where that share fell against the regime's intended 20-30% (tiny sizes: anywhere)
    assert any(f"{w} the heavy-copy regime's intended 20%-30%" in md for w in ("within", "below", "above")), md[-3000:]


@pytest.mark.slow
def test_bench_format_tiny_trained_state(tmp_path: Path) -> None:
    out = tmp_path / "format.md"
    _run(
        "bench_format",
        ["--n-embd", "64", "--size-gib", "0.01", "--train-steps", "1", "--repeats", "1", "--quiet", "--out", str(out)],
    )
    md = out.read_text()
    assert "trained: 1 AdamW steps" in md
    for row in ("raw read O_DIRECT", "memcpy new buffer", "host restore in place", "(fastest peer)"):
        assert f"{row}" in md, md[:3000]
    assert "| PASS |" in md or "| FAIL |" in md


@pytest.mark.slow
def test_bench_compress_quick(tmp_path: Path) -> None:
    out = tmp_path / "compress.md"
    _run("bench_compress", ["--quick", "--out", str(out)])
    md = out.read_text()
    for part in ("bf16 weights", "exp_avg_sq", "end-to-end flush on the local tier", "`auto` never wrote a full step"):
        assert part in md, md[:3000]
    assert "-%" not in md.split("Codec speeds", 1)[0]  # the load before/after, measured on Linux, is printed
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["modes"]) == {"bf16", "fp32"}


def test_compress_load_line_prints_a_measured_zero() -> None:
    from benchmarks.bench_compress import busy_pct

    assert busy_pct(0.0) == "0%"  # a quiet machine, measured
    assert busy_pct(0.884) == "88%"
    assert busy_pct(None) == "-"  # not measurable here


@pytest.mark.slow
def test_bench_slot_memory_quick(tmp_path: Path) -> None:
    out = tmp_path / "slot_memory.md"
    _run("bench_slot_memory", ["--rounds", "1", "--mib", "64", "--age-mib", "64", "--out", str(out)])
    md = out.read_text()
    for variant in ("private", "shared", "4k-buffer", "baseline"):
        assert f"| `{variant}` |" in md, md
    assert "`shared-huge` not run" in md
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["persist_s"]["private"]) == 1 and data["nbytes"] == 64 << 20
