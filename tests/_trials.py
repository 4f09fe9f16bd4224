"""Running a kill-trial worker (``python -m MODULE TRIALS SEED OUTDIR``, one JSON line per trial on stdout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_trials(
    module: str, n: int, outdir: Path, *, env: dict[str, str], cwd: Path
) -> tuple[int, list[dict[str, Any]]]:
    """Run ``n`` trials of ``module`` with the seed ``ASYMSTORE_TEST_SEED`` (default: from the clock, so every
    run explores other kill points; the seed is in every failure message); the seed and the ``n`` rows."""
    seed = int(os.environ.get("ASYMSTORE_TEST_SEED", time.time_ns() % 100_000))
    r = subprocess.run(
        [sys.executable, "-m", module, str(n), str(seed), str(outdir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=900,
    )
    assert r.returncode == 0, f"seed {seed}: {r.stderr[-4000:]}"
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == n, f"seed {seed}: {r.stdout[-2000:]}"
    return seed, rows
