"""The comparison benchmark (benchmarks/compare.py) runs end to end in its quick mode: a table per family with
every requested variant, restores checked, the JSON and the bar chart written. A smoke run: it checks that the
script works from a checkout, not what it measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_quick_writes_table_json_and_charts(tmp_path: Path) -> None:
    variants = "baseline,asym,deepfreeze,gemini,excp,torch.save"
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--quick", "--families", "gpt2,vit", "--variants", variants,
         "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (tmp_path / "compare.md").read_text()
    for v in variants.split(","):
        assert f"| {v} |" in md, md[:3000]
    assert "CPU:" in md and "lscpu" in md  # machine and date are in the report
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["machine"] and data["date"]
    fams = {f["family"]: f for f in data["families"]}
    assert set(fams) == {"gpt2", "vit"}
    for f in fams.values():
        rows = {row["variant"]: row for row in f["rows"]}
        assert set(rows) == set(variants.split(","))
        for name, row in rows.items():
            if name == "baseline":
                continue
            assert row["restores_ok"] == "1/1", (f["family"], name, row)
            assert row["median_stall_ms"] >= 0 and row["paired_pct"] == row["paired_pct"]
        assert 0 < rows["excp"]["stored_bytes"] < rows["asym"]["stored_bytes"]
        assert (tmp_path / f"compare_{f['family']}.png").stat().st_size > 1000
