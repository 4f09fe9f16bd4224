"""Both an editable and a wheel install expose asymstore.backends and asymstore.trainer_hooks,
and neither puts a top-level ``backends`` or ``trainer_hooks`` package into the environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, sys, asymstore, asymstore.backends.local, asymstore.backends.memory, "
    "asymstore.trainer_hooks, asymstore.trainer_hooks.executor, asymstore.testing.process; "
    "assert importlib.util.find_spec('backends') is None, 'top-level backends'; "
    "assert importlib.util.find_spec('trainer_hooks') is None, 'top-level trainer_hooks'; "
    "print(asymstore.__file__); print(asymstore.backends.__file__); print(asymstore.trainer_hooks.__file__)"
)


def _probe(env: dict[str, str], cwd: Path) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()


@pytest.mark.slow
def test_editable_install_imports(tmp_path) -> None:
    """The development install (what ./run.sh sets up) maps the subpackages to the repository folders."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    files = [os.path.realpath(f) for f in _probe(env, tmp_path)]  # elsewhere: the root is not on sys.path
    # asymstore/backends and asymstore/trainer_hooks are symlinks to the top-level folders: the same files
    assert files[1].startswith(str(ROOT / "backends")) and files[2].startswith(str(ROOT / "trainer_hooks"))


@pytest.mark.slow
def test_wheel_contents_and_install(tmp_path) -> None:
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = wheels.glob("asymstore-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "backends" not in tops and "trainer_hooks" not in tops, tops
    assert "asymstore/backends/local.py" in names and "asymstore/trainer_hooks/torch_hooks.py" in names
    assert not any(n.endswith(".pyc") for n in names)
    assert "asymstore/_native.pyi" in names and "asymstore/py.typed" in names  # typed package (PEP 561)
    assert not any(n.startswith("asymstore/backends/backends") for n in names)  # the symlinks are not followed twice
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc):  # the streaming copy is built where a compiler is (optional elsewhere)
        assert any(n.startswith("asymstore/_native.") and n.endswith(".so") for n in names), names
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(whl)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    files = _probe(env, tmp_path)
    assert all(f.startswith(str(target)) for f in files), files
