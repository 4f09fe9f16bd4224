"""pytest fixtures for a real HDFS (Hadoop's MiniDFSCluster, started once per session).

``hdfs_cluster`` yields a started :class:`tests.minidfs.MiniDFS` (``.url`` is
``hdfs://127.0.0.1:PORT``). Without Java, Maven or hdfs-native the tests that use it are skipped,
unless ``ASYMSTORE_REQUIRE_HDFS=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator

import pytest

from .minidfs import MiniDFS, MiniDFSError, missing_tools


def _unavailable(reason: str) -> None:
    if os.environ.get("ASYMSTORE_REQUIRE_HDFS") == "1":
        pytest.fail(f"ASYMSTORE_REQUIRE_HDFS=1 but the HDFS test cluster is unavailable: {reason}", pytrace=False)
    pytest.skip(f"HDFS test cluster unavailable: {reason} (set ASYMSTORE_REQUIRE_HDFS=1 to make this an error)")


@pytest.fixture(scope="session")
def hdfs_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniDFS]:
    if shutil.which("java") is None:
        missing = " and ".join(missing_tools())
        _unavailable(f"{missing} not found on PATH (need JDK 17, and Maven 3.8 to build hdfs-test-cluster/)")
    if importlib.util.find_spec("hdfs_native") is None:
        _unavailable("hdfs-native is not installed (pip install 'asymstore[hdfs]')")
    try:
        MiniDFS.build()
    except (MiniDFSError, OSError) as e:
        # Typically: Maven missing, or it cannot reach Central to fill its cache.
        _unavailable(f"building hdfs-test-cluster failed: {e}")
    dfs = MiniDFS()
    try:
        dfs.start(tmp_path_factory.mktemp("minidfs"))
        yield dfs
    finally:
        dfs.stop()
