"""The conformance suite run against the built-in backends, plus backend-specific checks."""

from __future__ import annotations

import os
import uuid

import pytest

from asymstore.backends import open_object_store
from asymstore.backends.local import LocalObjectStore
from asymstore.backends.memory import MemoryObjectStore, drop_namespace
from asymstore.errors import BackendUnavailableError, ConfigError

from .backend_conformance import ObjectStoreConformance


class TestMemoryBackend(ObjectStoreConformance):
    @pytest.fixture
    def store(self):
        name = f"conf-{uuid.uuid4().hex}"
        s = open_object_store(f"memory://{name}")
        assert isinstance(s, MemoryObjectStore)
        yield s
        drop_namespace(name)

    def test_namespaces_are_shared_by_name(self, store) -> None:
        store.put("x", b"1")
        assert open_object_store(store.url).get("x") == b"1"
        assert open_object_store(f"memory://other-{uuid.uuid4().hex}").get("x") is None


class TestLocalBackend(ObjectStoreConformance):
    @pytest.fixture
    def store(self, tmp_path):
        s = open_object_store(str(tmp_path / "root"))
        assert isinstance(s, LocalObjectStore)
        return s

    def test_file_url(self, tmp_path) -> None:
        s = open_object_store(f"file://{tmp_path}/u")
        s.put("a/b", b"1")
        assert (tmp_path / "u" / "a" / "b").read_bytes() == b"1"

    def test_file_url_with_host_rejected(self) -> None:
        with pytest.raises(ConfigError):
            open_object_store("file://somehost/x")

    def test_key_escape_rejected(self, store) -> None:
        for bad in ("../x", "/etc/passwd", "a/../../b"):
            with pytest.raises(ConfigError):
                store.put(bad, b"1")

    def test_atomic_put_leaves_no_temp_files(self, store) -> None:
        store.put_atomic("c/COMMIT", b"1")
        store.put_atomic("c/COMMIT", b"2")
        assert os.listdir(os.path.join(store.root, "c")) == ["COMMIT"]

    def test_unwritable_dir(self, tmp_path) -> None:
        if os.geteuid() == 0:
            pytest.skip("root can write anywhere")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(BackendUnavailableError):
                open_object_store(str(ro / "sub"))
            with pytest.raises(BackendUnavailableError):
                open_object_store(str(ro))
        finally:
            ro.chmod(0o700)

    def test_path_under_a_file(self, tmp_path) -> None:
        f = tmp_path / "afile"
        f.write_bytes(b"x")
        with pytest.raises(BackendUnavailableError):
            open_object_store(str(f / "sub"))


def test_unknown_scheme() -> None:
    with pytest.raises(ConfigError, match="nosuch"):
        open_object_store("nosuch://x")
