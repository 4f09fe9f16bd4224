"""Make ``asymstore.backends`` / ``asymstore.trainer_hooks`` resolve to *this* checkout.

The package maps ``backends/`` and ``trainer_hooks/`` into ``asymstore`` through setuptools'
package-dir mapping. An editable install of another checkout (a shared virtual environment
used by several git worktrees) maps them to that checkout's directories, even when
``PYTHONPATH`` puts this checkout's ``asymstore`` first. :func:`use_repo_packages` installs a
meta-path finder, before anything imports ``asymstore``, that serves the two sub-packages from
this checkout. In a checkout the installation points at (or a wheel), it changes nothing.
Used by the multi-process DeepSpeed tests (their worker processes start from a clean
interpreter) and by the DeepSpeed benchmark.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SUBPACKAGES = {"asymstore.backends": REPO / "backends", "asymstore.trainer_hooks": REPO / "trainer_hooks"}


class _RepoFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object, target: object = None):  # type: ignore[no-untyped-def]
        d = _SUBPACKAGES.get(fullname)
        if d is None or not (d / "__init__.py").exists():
            return None
        return importlib.util.spec_from_file_location(fullname, d / "__init__.py",
                                                      submodule_search_locations=[str(d)])


def use_repo_packages() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if not any(isinstance(f, _RepoFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RepoFinder())
    for name, d in _SUBPACKAGES.items():
        m = sys.modules.get(name)
        if m is not None and Path(list(m.__path__)[0]).resolve() != d:
            raise RuntimeError(f"{name} was already imported from {list(m.__path__)[0]}, not from {d}; "
                               "call use_repo_packages() before importing asymstore")
