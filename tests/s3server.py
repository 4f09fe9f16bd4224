"""A real S3-compatible server for tests and benchmarks: SeaweedFS (Apache-2.0), built from its Go module.

    SeaweedS3.build()                  # go build once into ~/.cache/asymstore/seaweedfs/<version>/weed
    with SeaweedS3() as s3:
        s3.start(tmp_path)             # master + volume + filer + S3 gateway on free loopback ports
        s3.endpoint                    # '127.0.0.1:PORT' (plain http)
        s3.options                     # backend options for S3ObjectStore: endpoint, scheme, credentials

The Go module comes from the Go module proxy (``go mod download``) and is built with the machine's Go
toolchain (``GOTOOLCHAIN=local``): a fresh machine builds it once (minutes on 2 cores; the module cache and
the build cache make a rebuild fast), later runs reuse the binary. ``ASYMSTORE_SEAWEEDFS_BIN`` points at a
binary built elsewhere. The server runs in its own process group, bound to 127.0.0.1, with its data in a
temporary directory and one S3 identity (access key / secret key) from a generated config file; ``stop``,
``__exit__`` and interpreter exit kill the whole group.

``pytest`` fixture: ``s3_server`` (session scope, below): skipped only where neither ``go`` nor a built
binary is there (or pyarrow is missing), a failure instead when ``ASYMSTORE_REQUIRE_S3=1`` (CI); a build or
start that fails is always a failure.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

#: the SeaweedFS Go module and the version built (the one the Go module proxy here serves)
MODULE = "github.com/seaweedfs/seaweedfs"
VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
CACHE_DIR = Path(os.environ.get("ASYMSTORE_CACHE", Path.home() / ".cache" / "asymstore")) / "seaweedfs" / VERSION
ACCESS_KEY = "asymstore-test"
SECRET_KEY = "asymstore-test-secret-key"

_live: weakref.WeakSet[SeaweedS3] = weakref.WeakSet()


class SeaweedError(RuntimeError):
    """SeaweedFS could not be built or started; the message carries the output tail."""


def _tail(path: Path | None, n: int = 40) -> str:
    if path is None or not path.exists():
        return "(no output)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:]) or "(no output)"


def binary_path() -> Path:
    """Where the cached ``weed`` binary lives (``ASYMSTORE_SEAWEEDFS_BIN`` overrides)."""
    override = os.environ.get("ASYMSTORE_SEAWEEDFS_BIN")
    return Path(override) if override else CACHE_DIR / "weed"


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GOTOOLCHAIN"] = "local"  # never download another toolchain: build with the machine's go
    env.setdefault("CGO_ENABLED", "0")
    return env


def build(*, timeout: float = 3600.0) -> Path:
    """Build the ``weed`` binary once (``go mod download`` + ``go build``) and return its path.

    Concurrent builders (two test processes) wait on one lock; a finished binary is reused. Raises
    :class:`SeaweedError` with go's output when the download or the build fails.
    """
    target = binary_path()
    if target.exists():
        return target
    go = shutil.which("go")
    if go is None:
        raise SeaweedError("go not found on PATH (needed once to build SeaweedFS, the test S3 server)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        t0 = time.monotonic()
        env = _go_env()
        r = subprocess.run(
            [go, "mod", "download", "-json", f"{MODULE}@{VERSION}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=target.parent,
        )
        if r.returncode != 0:
            raise SeaweedError(
                f"go mod download {MODULE}@{VERSION} failed (exit {r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
            )
        src = Path(json.loads(r.stdout)["Dir"])
        tmp = target.with_name(f"weed.tmp.{os.getpid()}")
        # the module's own go.mod (with its replace directives) is the main module when built in its directory
        cmd = [go, "build", "-buildvcs=false", "-o", str(tmp), "./weed"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=src)
        if r.returncode != 0 or not tmp.exists():
            tmp.unlink(missing_ok=True)
            out = "\n".join((r.stdout + r.stderr).splitlines()[-40:])
            raise SeaweedError(f"go build of SeaweedFS {VERSION} failed (exit {r.returncode}):\n{out}")
        os.replace(tmp, target)
        (target.parent / "build-seconds.txt").write_text(f"{time.monotonic() - t0:.0f}\n")
    return target


def _free_port_pair() -> int:
    """A free TCP port p on 127.0.0.1 with p + 10000 free too (SeaweedFS puts each gRPC port there)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise SeaweedError("no free pair of loopback ports (p, p + 10000) found")


class SeaweedS3:
    """One ``weed server -s3`` process group (master, volume server, filer and S3 gateway) on 127.0.0.1."""

    def __init__(self, *, start_timeout: float = 120.0, volume_size_mb: int = 1024) -> None:
        self.start_timeout = start_timeout
        self.volume_size_mb = volume_size_mb
        self.endpoint: str | None = None
        self.start_seconds: float | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def options(self) -> dict[str, str]:
        """Backend options of :class:`asymstore.backends.s3.S3ObjectStore` for this server."""
        assert self.endpoint is not None, "server not started"
        return {
            "endpoint_override": self.endpoint,
            "scheme": "http",
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "region": "us-east-1",
        }

    @property
    def environ(self) -> dict[str, str]:
        """The standard AWS environment variables that point a client at this server."""
        assert self.endpoint is not None, "server not started"
        return {
            "AWS_ENDPOINT_URL_S3": f"http://{self.endpoint}",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, tmpdir: str | os.PathLike[str]) -> str:
        """Start the server with its data under ``tmpdir``; return its ``host:port`` endpoint."""
        if self._proc is not None:
            raise SeaweedError("server already started")
        weed = build()
        tmp = Path(tmpdir)
        data = tmp / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = tmp / "s3.json"
        identity = {
            "name": "asymstore",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        master, volume, filer, s3 = (_free_port_pair() for _ in range(4))
        self.log_path = tmp / "seaweedfs.log"
        cmd = [
            str(weed),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={master}",
            f"-master.volumeSizeLimitMB={self.volume_size_mb}",
            f"-volume.port={volume}",
            "-volume.max=0",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={config}",
        ]
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _live.add(self)
        self.endpoint = f"127.0.0.1:{s3}"
        try:
            self._wait_ready()
        except BaseException:
            self._kill()
            raise
        self.start_seconds = time.monotonic() - t0
        return self.endpoint

    def _wait_ready(self) -> None:
        """Wait until the S3 gateway answers a signed request (a bucket can be created and listed)."""
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise SeaweedError(
                    f"SeaweedFS exited (code {proc.returncode if proc else None}):\n{_tail(self.log_path)}"
                )
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/", timeout=2).close()
            except urllib.error.HTTPError:
                pass  # the gateway answers (an anonymous request is refused): it is up
            except OSError as e:
                last = str(e)
                time.sleep(0.2)
                continue
            if self._probe_bucket():
                return
            time.sleep(0.3)
        raise SeaweedError(
            f"SeaweedFS S3 gateway not ready within {self.start_timeout:.0f} s ({last}):\n{_tail(self.log_path)}"
        )

    def _probe_bucket(self) -> bool:
        from pyarrow import fs as pafs

        s3 = pafs.S3FileSystem(
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_override=self.endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
            connect_timeout=2,
        )
        try:
            s3.create_dir("asymstore-ready")
            with s3.open_output_stream("asymstore-ready/probe") as out:
                out.write(b"ok")
            with s3.open_input_stream("asymstore-ready/probe") as f:
                ok = f.read() == b"ok"
            s3.delete_file("asymstore-ready/probe")
            return ok
        except OSError:
            return False

    def create_bucket(self, name: str) -> None:
        """Create a bucket (no error if it exists)."""
        from pyarrow import fs as pafs

        o = self.options
        s3 = pafs.S3FileSystem(
            access_key=o["access_key"],
            secret_key=o["secret_key"],
            endpoint_override=o["endpoint_override"],
            scheme="http",
            region=o["region"],
            allow_bucket_creation=True,
        )
        s3.create_dir(name)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL of its process group after 2 s: SeaweedFS waits 10 s on
        SIGTERM for its heartbeats, and its data is temporary)."""
        self._kill()

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):  # its data is temporary: no need to wait
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        _live.discard(self)

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> SeaweedS3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._kill()


@atexit.register
def _kill_all() -> None:
    for s in list(_live):
        s._kill()


def _unavailable(reason: str) -> None:
    if os.environ.get("ASYMSTORE_REQUIRE_S3") == "1":
        pytest.fail(f"ASYMSTORE_REQUIRE_S3=1 but the S3 test server is unavailable: {reason}", pytrace=False)
    pytest.skip(f"S3 test server unavailable: {reason} (set ASYMSTORE_REQUIRE_S3=1 to make this an error)")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A started SeaweedFS S3 server for the whole session; the standard AWS variables point at it."""
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        _unavailable("pyarrow is not installed (pip install 'asymstore[s3]')")
    if not binary_path().exists() and shutil.which("go") is None:
        _unavailable("go not found on PATH (the Go toolchain builds SeaweedFS, the test S3 server, once)")
    try:
        build()
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"building SeaweedFS timed out: {e}", pytrace=False)
    except (SeaweedError, OSError) as e:
        pytest.fail(f"building SeaweedFS failed: {e}", pytrace=False)
    server = SeaweedS3()
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL_S3",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "AWS_EC2_METADATA_DISABLED",
        )
    }
    try:
        try:
            server.start(tmp_path_factory.mktemp("seaweedfs"))
        except SeaweedError as e:
            pytest.fail(f"starting SeaweedFS failed: {e}", pytrace=False)
        # URLs opened without options (a new process, open_object_store(url)) reach the server through the
        # standard AWS environment
        os.environ.update(server.environ)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
