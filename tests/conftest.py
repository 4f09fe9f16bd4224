"""Suite-wide pytest set-up: the HDFS fixtures, and every test on the real MiniDFSCluster counted as slow."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.hdfs_fixtures"]


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that uses the ``hdfs_cluster`` fixture or carries the ``hdfs`` marker gets both ``hdfs`` and
    ``slow``: starting and driving a MiniDFSCluster takes seconds per test, so ``-m "not slow"`` skips them."""
    for item in items:
        if "hdfs_cluster" in getattr(item, "fixturenames", ()) or item.get_closest_marker("hdfs") is not None:
            if item.get_closest_marker("hdfs") is None:
                item.add_marker(pytest.mark.hdfs)
            if item.get_closest_marker("slow") is None:
                item.add_marker(pytest.mark.slow)


def pytest_configure(config: pytest.Config) -> None:
    """Shared-memory host slots of the whole run (and of the processes it starts) go to one directory of this
    run under /dev/shm, removed at the end: a test's killed or unclosed store never litters /dev/shm."""
    import os
    import tempfile

    if "ASYMSTORE_SHM_DIR" in os.environ or not os.path.isdir("/dev/shm"):
        return
    d = tempfile.mkdtemp(prefix="asymstore-tests-", dir="/dev/shm")
    os.environ["ASYMSTORE_SHM_DIR"] = d
    config.stash[_SHM_KEY] = d


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the run's shared-memory directory."""
    import os
    import shutil

    d = config.stash.get(_SHM_KEY, None)
    if d is not None:
        shutil.rmtree(d, ignore_errors=True)
        os.environ.pop("ASYMSTORE_SHM_DIR", None)


_SHM_KEY = pytest.StashKey[str]()
