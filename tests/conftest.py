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
