"""Make ``asymstore.trainer_hooks`` resolve to this checkout's ``trainer_hooks/`` first.

An editable install maps ``asymstore.trainer_hooks`` to the directory it was installed from;
when tests run from another checkout (a git worktree), new modules live here instead. This
prepends this checkout's folder to the package path (a no-op when it is already the one).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_this_checkout() -> None:
    import asymstore.trainer_hooks as th
    here = str(ROOT / "trainer_hooks")
    paths = list(th.__path__)
    if not paths or Path(paths[0]).resolve() != Path(here).resolve():
        th.__path__.insert(0, here)


use_this_checkout()
