"""Run Hadoop's MiniDFSCluster (``hdfs-test-cluster/`` in the repository) from Python, for tests and demos.

    with MiniDFS() as dfs:            # builds the launcher with Maven if needed
        url = dfs.start(tmp_path)     # 'hdfs://127.0.0.1:PORT'
        ...
        dfs.stop_namenode(); dfs.start_namenode()   # fault injection, same port

The JVM runs in its own process group with its stdin connected to this process: it exits when
asked (``stop``), when this process dies (stdin closes), and the process group is killed on
``stop()``/``__exit__``/interpreter exit, so no JVM is left behind.
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path

#: The Maven project (in a source checkout); ASYMSTORE_HDFS_TEST_CLUSTER overrides it.
PROJECT_DIR = Path(
    os.environ.get("ASYMSTORE_HDFS_TEST_CLUSTER") or Path(__file__).resolve().parents[1] / "hdfs-test-cluster"
)
JAR_NAME = "hdfs-test-cluster.jar"

_live: weakref.WeakSet[MiniDFS] = weakref.WeakSet()


class MiniDFSError(RuntimeError):
    """The MiniDFSCluster could not be built, started or commanded; the message carries the Java output tail."""


def missing_tools() -> list[str]:
    """Names of the tools needed to build and run the cluster that are not on PATH (``java``, ``mvn``)."""
    return [t for t in ("java", "mvn") if shutil.which(t) is None]


def _tail(path: Path | None, n: int = 40) -> str:
    if path is None or not path.exists():
        return "(no output)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:]) or "(no output)"


class MiniDFS:
    """One MiniDFSCluster JVM (one NameNode, ``datanodes`` DataNodes) bound to 127.0.0.1."""

    def __init__(
        self,
        *,
        project_dir: str | os.PathLike[str] | None = None,
        block_size: int = 1 << 20,
        datanodes: int = 1,
        replication: int = 1,
        close_committed: int = 0,
        ibr_interval_ms: int = 0,
        heap: str = "512m",
        start_timeout: float = 120.0,
        command_timeout: float = 60.0,
        java_opts: tuple[str, ...] = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto"),
        cds: bool = True,
    ) -> None:
        self.project_dir = Path(project_dir) if project_dir else PROJECT_DIR
        self.block_size = block_size
        self.datanodes = datanodes
        self.replication = replication
        self.close_committed = close_committed
        self.ibr_interval_ms = ibr_interval_ms
        self.heap = heap
        self.start_timeout = start_timeout
        self.command_timeout = command_timeout
        self.java_opts = java_opts
        self.cds = cds
        self._cds_tmp: Path | None = None
        self.url: str | None = None
        self.start_seconds: float | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()

    # --- build ------------------------------------------------------------------------
    @classmethod
    def build(cls, project_dir: str | os.PathLike[str] | None = None, *, timeout: float = 900.0) -> Path:
        """Build the launcher (``mvn -q -o package``, online if the offline build fails); skip when up to date."""
        proj = Path(project_dir) if project_dir else PROJECT_DIR
        jar = proj / "target" / JAR_NAME
        lib = proj / "target" / "lib"
        if jar.exists() and lib.is_dir() and any(lib.iterdir()):
            sources = [proj / "pom.xml", *(p for p in (proj / "src").rglob("*") if p.is_file())]
            if jar.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
                return jar
        missing = missing_tools()
        if missing:
            raise MiniDFSError(
                f"cannot build {proj}: {', '.join(missing)} not found on PATH (need JDK 17 and Maven 3.8)"
            )
        errors = []
        for args in (["mvn", "-q", "-o", "package"], ["mvn", "-q", "package"]):
            r = subprocess.run(args, cwd=proj, capture_output=True, text=True, timeout=timeout)
            if r.returncode == 0 and jar.exists():
                return jar
            errors.append(
                f"$ {' '.join(args)} (exit {r.returncode})\n" + "\n".join((r.stdout + r.stderr).splitlines()[-25:])
            )
        raise MiniDFSError(f"building {proj} failed:\n" + "\n\n".join(errors))

    # --- lifecycle --------------------------------------------------------------------
    def start(self, tmpdir: str | os.PathLike[str]) -> str:
        """Start the cluster with its data under ``tmpdir``; return its ``hdfs://127.0.0.1:PORT`` URL."""
        if self._proc is not None:
            raise MiniDFSError("MiniDFS already started")
        jar = self.build(self.project_dir)
        java = shutil.which("java")
        if java is None:
            raise MiniDFSError("java not found on PATH (need JDK 17)")
        tmp = Path(tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / "minidfs.log"
        cmd = [
            java,
            f"-Xmx{self.heap}",
            *self.java_opts,
            *self._cds_opts(jar),
            "-jar",
            str(jar),
            str(tmp / "data"),
            "--block-size",
            str(self.block_size),
            "--datanodes",
            str(self.datanodes),
            "--replication",
            str(self.replication),
            "--close-committed",
            str(self.close_committed),
            "--ibr-interval-ms",
            str(self.ibr_interval_ms),
        ]
        t0 = time.monotonic()
        with open(self.log_path, "w") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
                start_new_session=True,  # own process group: killed as a whole
            )
        _live.add(self)
        threading.Thread(target=self._pump, args=(self._proc,), daemon=True, name="minidfs-stdout").start()
        try:
            line = self._expect(("HDFS_URL=",), self.start_timeout, "start")
        except BaseException:
            self._kill()
            raise
        self.url = line.split("=", 1)[1].strip()
        self.start_seconds = time.monotonic() - t0
        return self.url

    def _cds_opts(self, jar: Path) -> list[str]:
        """Application class-data sharing: the first run dumps the loaded classes at exit, later runs map
        them (start-up ~2.5x faster on this machine type). A stale or foreign archive is ignored by the JVM."""
        if not self.cds:
            return []
        jsa = jar.with_suffix(".jsa")
        if jsa.exists() and jsa.stat().st_mtime >= jar.stat().st_mtime:
            return [f"-XX:SharedArchiveFile={jsa}"]
        self._cds_tmp = jsa.with_name(f"{jsa.name}.{os.getpid()}.{id(self)}.tmp")
        return [f"-XX:ArchiveClassesAtExit={self._cds_tmp}"]

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _expect(self, prefixes: tuple[str, ...], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MiniDFSError(
                    f"MiniDFSCluster: no answer to {what!r} within {timeout:.0f} s; Java output tail:\n{_tail(self.log_path)}"
                )
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                rc = self._proc.wait(5) if self._proc else None
                raise MiniDFSError(
                    f"MiniDFSCluster exited (code {rc}) during {what!r}; Java output tail:\n{_tail(self.log_path)}"
                )
            if line.startswith(prefixes):
                return line
            if line.startswith("ERR"):
                raise MiniDFSError(f"MiniDFSCluster: {line}; Java output tail:\n{_tail(self.log_path)}")

    def _command(self, cmd: str) -> str:
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None or proc.stdin is None:
                raise MiniDFSError(f"MiniDFSCluster is not running (command {cmd!r})")
            proc.stdin.write(cmd + "\n")
            proc.stdin.flush()
            return self._expect((f"OK {cmd}",), self.command_timeout, cmd)

    def stop_namenode(self) -> None:
        """Stop the NameNode (the DataNode keeps running); clients then get 'connection refused'."""
        self._command("stop-namenode")

    def start_namenode(self) -> None:
        """Restart the NameNode on the same port; returns when it is out of safe mode."""
        self._command("start-namenode")

    def freeze(self) -> None:
        """Freeze the whole cluster (SIGSTOP of its JVM): connections stay open and nothing answers, as with a
        NameNode stuck in a long GC pause or a network that drops packets."""
        if self._proc is None:
            raise MiniDFSError("MiniDFSCluster is not running")
        os.kill(self._proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Undo :meth:`freeze`."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the cluster and wait for the JVM to exit (killing its process group if it lingers)."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write("stop\n")
                    proc.stdin.flush()
                    proc.stdin.close()
                except (BrokenPipeError, OSError, ValueError):
                    pass
                try:
                    # Dumping the class-data archive at the first exit can take a few seconds more.
                    proc.wait(timeout=60 if self._cds_tmp else 20)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._kill()
            self._finish_cds()

    def _finish_cds(self) -> None:
        tmp, self._cds_tmp = self._cds_tmp, None
        if tmp is None:
            return
        try:
            if tmp.exists() and tmp.stat().st_size > 0:
                os.replace(tmp, tmp.with_name(tmp.name.split(".jsa.", 1)[0] + ".jsa"))
            else:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        self.url = None
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=wait)
                # The JVM is gone; its group may still hold children (none expected). Kill once more.
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                if f is not None:
                    f.close()
            except Exception:
                pass
        _live.discard(self)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MiniDFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:
            pass


@atexit.register
def _kill_all() -> None:
    for d in list(_live):
        d._kill()
