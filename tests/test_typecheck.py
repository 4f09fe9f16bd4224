"""The package is typed: ``mypy -p asymstore`` (strict, configured in pyproject.toml) passes on asymstore,
asymstore.backends and asymstore.trainer_hooks (``./run.sh lint`` runs the same check in CI)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_mypy_clean() -> None:
    pytest.importorskip("mypy")
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "-p", "asymstore"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
