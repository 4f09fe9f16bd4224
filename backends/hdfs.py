"""HDFS tier backend on ``hdfs-native`` (the native RPC protocol in Rust: no JVM, no libhdfs).

URL form: ``hdfs://host:port/path/to/root``. Keys are paths below the root.

Why these choices:

* Fail fast. hdfs-native retries an unreachable NameNode for about three minutes by default;
  a checkpoint tier must not stall training that long. ``dfs.client.failover.max.attempts`` is
  set to 0 and this backend does its own short, bounded retry (``retries``, ``backoff_s``, with
  :func:`asymstore.retry.retry`). When the NameNode stays unreachable the call raises
  :class:`BackendUnavailableError` naming the URL.
* One object = one HDFS file. ``put`` streams the given buffers in slices of at most
  ``write_chunk`` bytes without joining them (each slice is copied once into a ``bytes``: hdfs-native
  converts other buffer types byte by byte, which is 10x slower); it is durable when the file is closed (all DataNodes
  of the pipeline acknowledged every packet and the NameNode completed the file). ``hsync=True``
  additionally makes the DataNodes fsync before close.
* ``put_atomic`` writes a hidden temporary file next to the key and renames it over the key
  (HDFS rename with overwrite is atomic at the NameNode).
* ``delete_prefix`` uses one recursive delete per matching directory instead of deleting every object;
  ``list_dirs`` lists the directory once and each child until its first object (a directory left empty
  by ``delete`` is not listed).
"""

from __future__ import annotations

import builtins
import posixpath
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar
from urllib.parse import SplitResult, urlsplit

from asymstore.errors import BackendUnavailableError, ConfigError
from asymstore.retry import Backoff, is_transient_error, is_unreachable_error, poll, retry

from .base import Buffer, ByteRange, Capabilities, ObjectStore, as_buffers, check_key, check_prefix, dir_prefix

T = TypeVar("T")

#: Prefix of put_atomic's temporary files; listings skip them.
TMP_PREFIX = ".asymstore-tmp."

_INSTALL_HINT = "the HDFS backend needs hdfs-native: pip install 'asymstore[hdfs]' (or pip install hdfs-native)"

# Substrings of hdfs-native error messages that mean "try again" (network, NameNode restarting or
# in safe mode, a DataNode pipeline that broke). Anything else (missing file, permission denied,
# file exists) is not retried.
_TRANSIENT_MARKERS = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "broken pipe",
    "timed out",
    "timeout",
    "os error 111",
    "os error 104",
    "os error 32",
    "os error 110",
    "unexpected eof",
    "early eof",
    "safemodeexception",
    "safe mode",
    "retriableexception",
    "standbyexception",
    "not enough",  # e.g. "not enough DataNodes" while the DataNode re-registers
    "could only be written to",
    "failed to connect",
    "no route to host",
    "network is unreachable",
    "os error 101",
    "os error 113",
    "failed to lookup address",
    "name or service not known",
    "temporary failure in name resolution",
)
# Of those, the ones that mean "the NameNode is not there" (reported as BackendUnavailableError).
_UNREACHABLE_MARKERS = (
    "connection refused",
    "os error 111",
    "no route to host",
    "failed to connect",
    "timed out",
    "os error 110",
    "network is unreachable",
    "os error 101",
    "os error 113",
    "failed to lookup address",
    "name or service not known",
    "temporary failure in name resolution",
)


def _is_transient(exc: BaseException) -> bool:
    """Whether an hdfs-native error is worth retrying (network, NameNode restarting, pipeline rebuilt)."""
    return is_transient_error(exc, _TRANSIENT_MARKERS, kinds=(OSError, RuntimeError))


def _names_no_file(exc: BaseException) -> bool:
    """A path that cannot be a file: a directory, or below a file ("... (is not a directory)")."""
    msg = str(exc).lower()
    return "is a directory" in msg or "not a file" in msg or "is not a directory" in msg


def _is_unreachable(exc: BaseException) -> bool:
    """Whether an error means the NameNode is not there at all (rather than a transient failure)."""
    return is_unreachable_error(exc, _UNREACHABLE_MARKERS)


def check_url(url: str, config: dict[str, str]) -> SplitResult:
    """Parse ``hdfs://host:port/path``: a port in 1..65535 is required, unless ``host`` is an HA nameservice
    (``dfs.ha.namenodes.<host>`` in ``config``, or a Hadoop configuration in ``HADOOP_CONF_DIR``)."""
    parts = urlsplit(url)
    if parts.scheme != "hdfs" or not parts.hostname:
        raise ConfigError(f"HDFS URL must look like hdfs://host:port/path, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(
            f"{url}: the port must be in 1..65535 (the NameNode's RPC port, usually 8020 or 9000), "
            f"got {parts.netloc.rpartition(':')[2]!r}"
        )
    if port is None:
        import ipaddress
        import os

        host = parts.hostname
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = host == "localhost"
        if literal or not (f"dfs.ha.namenodes.{host}" in config or os.environ.get("HADOOP_CONF_DIR")):
            raise ConfigError(
                f"{url} has no port: write hdfs://{host}:8020{parts.path or '/'} with the NameNode's RPC port "
                "(its dfs.namenode.rpc-address / fs.defaultFS), or name an HA nameservice configured in "
                "config= (dfs.ha.namenodes.<name>) or HADOOP_CONF_DIR"
            )
    return parts


class HdfsObjectStore(ObjectStore):
    """Objects as files under ``hdfs://host:port/root``, through ``hdfs_native.Client``.

    Keyword-only options:

    * ``retries`` (3) and ``backoff_s`` (0.5, doubling, capped at ``max_backoff_s`` = 4): bounded retry
      of transient errors; with the defaults an unreachable NameNode is reported after ~3.5 s of waiting.
    * ``write_chunk`` (8 MiB): the largest slice handed to the client per write call (and the
      largest temporary copy made: hdfs-native needs ``bytes``, see ``_write_file``).
    * ``block_size`` / ``replication``: per-file HDFS settings (``None``: the cluster's defaults).
    * ``hsync`` (False): fsync on the DataNodes before closing each file (slower; close alone already
      means every replica acknowledged the data).
    * ``visible_wait_s`` (10): how long a read waits for a just-closed file's last block to become
      visible to readers (see ``_open_visible``; only matters with num-committed-allowed > 0).
    * ``timeout_s`` (60): the longest one call (each retry attempt) may take, plus ``write_chunk``-sized
      slices at 4 MiB/s for writes; a NameNode that accepts connections but never answers (frozen, or an
      address that drops packets) gives a :class:`BackendUnavailableError` after that, never a hang. The
      client has no deadline of its own: the call runs on a worker thread, which is left behind if it hangs.
    * ``config``: extra hdfs-native / Hadoop client settings, merged over the fail-fast defaults.
    * ``client`` ("hdfs-native"): ``"pyarrow"`` opens pyarrow's ``HadoopFileSystem`` (libhdfs + JVM) instead,
      with that client's options (:class:`~asymstore.backends.s3.PyArrowHdfsObjectStore`).
    """

    capabilities = Capabilities(durable=True, volatile=False, atomic_rename=True, ranged_reads=True)

    def __new__(cls, url: str, *, client: str = "hdfs-native", **options: Any) -> Any:
        """``client="pyarrow"`` opens pyarrow's libhdfs client instead (:class:`~asymstore.backends.s3.PyArrowHdfsObjectStore`)."""
        if client == "pyarrow":
            from .s3 import PyArrowHdfsObjectStore

            return PyArrowHdfsObjectStore(url, **options)
        if client != "hdfs-native":
            raise ConfigError(f"HDFS option client must be 'hdfs-native' (default) or 'pyarrow', got {client!r}")
        return super().__new__(cls)

    def __init__(
        self,
        url: str,
        *,
        client: str = "hdfs-native",
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 4.0,
        write_chunk: int = 8 << 20,
        block_size: int | None = None,
        replication: int | None = None,
        hsync: bool = False,
        visible_wait_s: float = 10.0,
        timeout_s: float = 60.0,
        config: dict[str, str] | None = None,
    ) -> None:
        super().__init__(url)
        parts = check_url(url, config or {})
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0 or write_chunk <= 0:
            raise ConfigError("retries, backoff_s, max_backoff_s must be >= 0 and write_chunk > 0")
        if not timeout_s > 0:
            raise ConfigError(f"HDFS option timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        #: calls run here, each awaited at most its deadline (hdfs-native has no RPC timeout of its own)
        self._calls = ThreadPoolExecutor(max_workers=8, thread_name_prefix="asymstore-hdfs")
        try:
            import hdfs_native
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise BackendUnavailableError(f"{url}: {_INSTALL_HINT}") from e

        self._hdfs_native = hdfs_native
        self.namenode = f"hdfs://{parts.netloc}"
        root = posixpath.normpath("/" + parts.path.strip("/")) if parts.path.strip("/") else "/"
        self.root = root
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.write_chunk = write_chunk
        self.block_size = block_size
        self.replication = replication
        self.hsync = hsync
        self.visible_wait_s = visible_wait_s
        cfg = {
            # Fail fast: hdfs-native's own NameNode retry loop would otherwise last about 3 minutes.
            "dfs.client.failover.max.attempts": "0",
            "dfs.client.failover.sleep.base.millis": "100",
            "dfs.client.failover.sleep.max.millis": "1000",
        }
        cfg.update(config or {})
        self._config = cfg
        self._client: Any = hdfs_native.Client(self.namenode, config=cfg)

    # --- helpers ----------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return posixpath.join(self.root, check_key(key))

    def _dir(self, prefix: str) -> str:
        """The HDFS directory of a directory prefix (``''``: the root)."""
        d = dir_prefix(prefix)
        return posixpath.join(self.root, d.rstrip("/")) if d else self.root

    def _rel(self, path: str) -> str:
        # hdfs-native returns absolute paths for recursive listings.
        if self.root == "/":
            return path.lstrip("/")
        if path.startswith(self.root + "/"):
            return path[len(self.root) + 1 :]
        return path.lstrip("/")

    def _deadline(self, what: str, fn: Callable[[], T], timeout_s: float) -> T:
        """``fn()`` on a worker thread, awaited at most ``timeout_s``."""
        fut = self._calls.submit(fn)
        try:
            return fut.result(timeout=timeout_s)
        except FutureTimeout:
            raise BackendUnavailableError(
                f"HDFS at {self.url} did not answer within {timeout_s:.0f} s ({what}): the NameNode at "
                f"{self.namenode} is frozen, overloaded or unreachable (packets dropped). The timeout is the "
                "backend option timeout_s."
            ) from None

    def _call(self, what: str, fn: Callable[[], T], *, nbytes: int = 0) -> T:
        """Run ``fn`` with bounded retry of transient errors, each attempt within the call deadline
        (``timeout_s``, longer for ``nbytes`` to write); map "NameNode gone" to BackendUnavailableError."""
        limit = self.timeout_s + nbytes / (4 << 20)

        def give_up(e: BaseException, attempts: int, elapsed: float) -> BaseException:
            if _is_unreachable(e):
                return BackendUnavailableError(
                    f"HDFS at {self.url} is unreachable ({what} failed {attempts} times in "
                    f"{elapsed:.1f} s: {e}). Check that the NameNode at {self.namenode} is running and "
                    f"that host and port match its dfs.namenode.rpc-address (fs.defaultFS)."
                )
            return BackendUnavailableError(
                f"HDFS at {self.url}: {what} failed {attempts} times in {elapsed:.1f} s with a "
                f"transient error: {e}. Check the NameNode ({self.namenode}) and DataNode health."
            )

        backoff = Backoff(initial_s=self.backoff_s, max_s=self.max_backoff_s, factor=2.0, floor_s=0.05)
        return retry(
            lambda: self._deadline(what, fn, limit),
            retries=self.retries,
            transient=_is_transient,
            backoff=backoff,
            give_up=give_up,
        )

    def _write_options(self) -> Any:
        return self._hdfs_native.WriteOptions(
            overwrite=True,
            create_parent=True,
            block_size=self.block_size,
            replication=self.replication,
        )

    def _write_file(self, path: str, bufs: list[memoryview]) -> None:
        writer = self._client.create(path, self._write_options())
        try:
            chunk = self.write_chunk
            for b in bufs:
                n = len(b)
                if n == 0:
                    continue
                whole = b.obj if type(b.obj) is bytes and len(b.obj) == n else None
                if whole is not None and n <= chunk:
                    writer.write(whole)
                    continue
                # hdfs-native 0.14 converts anything but bytes/bytearray element by element (a
                # memoryview writes at ~50 MiB/s of CPU); a bounded bytes copy per slice is a memcpy.
                for off in range(0, n, chunk):
                    writer.write(bytes(b[off : off + chunk]))
            if self.hsync:
                writer.hsync()
        except BaseException:
            try:
                writer.close()
            except Exception:
                pass
            raise
        writer.close()

    # --- writes -----------------------------------------------------------------------
    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write ``key`` as one HDFS file (durable once closed: every replica acknowledged it)."""
        path = self._path(key)
        bufs = as_buffers(data)
        self._call(f"put {key!r}", lambda: self._write_file(path, bufs), nbytes=sum(len(b) for b in bufs))

    def put_atomic(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write a hidden temporary file next to ``key`` and rename it over ``key`` (atomic at the NameNode)."""
        path = self._path(key)
        bufs = as_buffers(data)
        parent, name = posixpath.split(path)

        def attempt() -> None:
            tmp = posixpath.join(parent, f"{TMP_PREFIX}{name}.{uuid.uuid4().hex}")
            try:
                self._write_file(tmp, bufs)
                self._client.rename(tmp, path, True)
            except BaseException:
                try:
                    self._client.delete(tmp, False)
                except Exception:
                    pass
                raise

        self._call(f"put_atomic {key!r}", attempt)

    def create_exclusive(self, key: str, data: Buffer | Sequence[Buffer]) -> bool:
        """Write a hidden temporary next to ``key`` and rename it to ``key`` without overwrite (the NameNode
        refuses the rename when ``key`` exists: of racing writers exactly one succeeds).

        A retried attempt whose first rename went through although its answer was lost finds ``key`` holding
        exactly its own bytes, and counts as created.
        """
        path = self._path(key)
        bufs = as_buffers(data)
        parent, name = posixpath.split(path)
        renamed = False  # a rename was sent (its answer may have been lost)

        def attempt() -> bool:
            nonlocal renamed
            if self._exists_path(path):
                return self._holds(path, bufs) if renamed else False
            tmp = posixpath.join(parent, f"{TMP_PREFIX}{name}.{uuid.uuid4().hex}")
            try:
                try:
                    self._write_file(tmp, bufs)
                    renamed = True
                    self._client.rename(tmp, path, False)
                except (OSError, RuntimeError) as e:
                    if isinstance(e, FileExistsError) or "already exist" in str(e).lower():
                        return False
                    # the temporary was removed by the clean-up of a directory another writer claimed
                    if isinstance(e, FileNotFoundError) and self._exists_path(path):
                        return False
                    raise
                return True
            finally:
                try:
                    self._client.delete(tmp, False)
                except Exception:
                    pass

        return self._call(f"create_exclusive {key!r}", attempt)

    def _exists_path(self, path: str) -> bool:
        try:
            self._client.get_file_info(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def _holds(self, path: str, bufs: list[memoryview]) -> bool:
        """Whether the file at ``path`` holds exactly ``bufs`` (one read; used only for small records)."""
        reader = self._open(path)
        return reader is not None and bytes(reader.read()) == b"".join(bufs)

    def remove_temporaries(self, prefix: str, *, older_than_s: float = 0.0) -> int:
        """Delete the hidden temporaries in the directory ``prefix`` not modified for ``older_than_s`` seconds."""
        import time

        d = self._dir(prefix)

        def run() -> int:
            now_ms = time.time() * 1000
            n = 0
            for st in self._list_dir(d):
                name = posixpath.basename(st.path)
                if st.isdir or not name.startswith(TMP_PREFIX):
                    continue
                if now_ms - float(getattr(st, "modification_time", 0)) < older_than_s * 1000:
                    continue
                try:
                    self._client.delete(posixpath.join(d, name), False)
                    n += 1
                except FileNotFoundError:
                    pass
            return n

        return self._call(f"remove_temporaries {prefix!r}", run)

    def delete(self, key: str) -> None:
        """Delete the file of ``key`` if present."""
        path = self._path(key)

        def run() -> None:
            try:
                self._client.delete(path, False)
            except FileNotFoundError:
                pass

        self._call(f"delete {key!r}", run)

    def delete_prefix(self, prefix: str) -> int:
        """Remove everything under ``prefix`` with one recursive delete per matching directory."""
        check_prefix(prefix)
        if prefix == "" or prefix.endswith("/"):
            d = self._dir(prefix)
            return self._call(f"delete_prefix {prefix!r}", lambda: self._delete_tree(d, keep_dir=(d == self.root)))
        # A partial name ("step_00"): match the parent's children by name.
        parent_key, partial = posixpath.split(prefix)
        parent = self._dir(parent_key)

        def run() -> int:
            n = 0
            for st in self._list_dir(parent):
                name = posixpath.basename(st.path)
                if name.startswith(partial):
                    child = posixpath.join(parent, name)
                    if st.isdir:
                        n += self._delete_tree(child, keep_dir=False)
                    else:
                        self._client.delete(child, False)
                        n += 0 if name.startswith(TMP_PREFIX) else 1
            return n

        return self._call(f"delete_prefix {prefix!r}", run)

    def _delete_tree(self, d: str, *, keep_dir: bool) -> int:
        try:
            if not self._client.get_file_info(d).isdir:  # an object: not a directory prefix of anything
                return 0
            count = int(self._client.get_content_summary(d).file_count)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        if keep_dir:
            for st in self._list_dir(d):
                self._client.delete(posixpath.join(d, posixpath.basename(st.path)), True)
        else:
            self._client.delete(d, True)
        return count

    # --- reads ------------------------------------------------------------------------
    def _open(self, path: str) -> Any:
        try:
            return self._client.read(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except (OSError, RuntimeError) as e:
            if _names_no_file(e):
                return None
            raise

    def _open_visible(self, path: str, end: int | None) -> Any:
        """Open ``path`` and make sure the reader sees the whole file when the read reaches its end.

        A reader's length comes from the NameNode's block list, which leaves out a last block that was
        committed but not yet reported by a DataNode (a NameNode with
        ``dfs.namenode.file.close.num-committed-allowed`` > 0 lets ``close`` succeed in that state, and
        hdfs-native does not ask the DataNode for the visible length): the file reads short although
        ``get_file_info`` has the right length. When the read needs the end of the file (``end`` None or
        past the reader's length), compare with ``get_file_info`` (one RPC) and reopen until they agree.
        """
        reader = self._open(path)
        if reader is None or (end is not None and end <= len(reader)):
            return reader
        state: dict[str, Any] = {"reader": reader, "seen": len(reader), "length": None}

        def whole() -> tuple[Any] | None:
            current = state["reader"]
            if current is None:  # reopen: the last reader saw too little
                current = self._open(path)
                if current is None:
                    return (None,)
                state["reader"], state["seen"] = current, len(current)
            try:
                info = self._client.get_file_info(path)
            except FileNotFoundError:
                return (None,)
            state["length"] = int(info.length)
            if state["length"] <= len(current):
                return (current,)
            state["reader"] = None
            return None

        got = poll(whole, timeout_s=self.visible_wait_s, backoff=Backoff(initial_s=0.02, max_s=0.5))
        if got is None:
            raise TimeoutError(
                f"{path}: readers see {state['seen']} of {state['length']} bytes after {self.visible_wait_s:.0f} s "
                "(last block not reported by any DataNode)"
            )
        return got[0]

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | None:
        """Read the object, or the range :meth:`ByteRange.resolve` gives, with one ranged read."""
        path = self._path(key)

        if byte_range is None or byte_range.start < 0:
            end = None
        else:
            end = byte_range.start + byte_range.length

        def run() -> bytes | None:
            reader = self._open_visible(path, end)
            if reader is None:
                return None
            size = len(reader)
            start, stop = (0, size) if byte_range is None else byte_range.resolve(size)
            if stop == start:
                return b""
            return bytes(reader.read_range(start, stop - start))

        return self._call(f"get {key!r}", run)

    def get_into(self, key: str, out: memoryview, offset: int = 0) -> bool:
        """Stream ``len(out)`` bytes at ``offset`` into ``out`` (no object-sized temporary)."""
        path = self._path(key)
        out = memoryview(out).cast("B")
        want = len(out)

        def run() -> bool:
            reader = self._open_visible(path, None if offset < 0 else offset + want)
            if reader is None:
                return False
            size = len(reader)
            start, stop = ByteRange(offset, want).resolve(size)
            if stop - start != want:
                raise EOFError(f"{key}: wanted {want} bytes at {offset}, object has {size}")
            pos = 0
            if want:
                for piece in reader.read_range_stream(start, want):
                    n = len(piece)
                    out[pos : pos + n] = piece
                    pos += n
            if pos != want:
                raise EOFError(f"{key}: short read, got {pos} of {want} bytes at {offset}")
            return True

        return self._call(f"get_into {key!r}", run)

    def size(self, key: str) -> int | None:
        """Length of the file of ``key`` from the NameNode, ``None`` if missing or a directory."""
        path = self._path(key)

        def run() -> int | None:
            try:
                st = self._client.get_file_info(path)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except (OSError, RuntimeError) as e:
                if _names_no_file(e):
                    return None
                raise
            return None if st.isdir else int(st.length)

        return self._call(f"size {key!r}", run)

    def _list_dir(self, d: str) -> list[Any]:
        try:
            return list(self._client.list_status(d, False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _walk(self, d: str) -> list[str]:
        try:
            sts = list(self._client.list_status(d, True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        # (listing a file lists that file: keep only what lies below ``d``)
        below = d.rstrip("/") + "/"
        return [
            self._rel(st.path)
            for st in sts
            if not st.isdir and st.path.startswith(below) and not posixpath.basename(st.path).startswith(TMP_PREFIX)
        ]

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix``, recursively (one recursive listing of the deepest directory that covers it)."""
        check_prefix(prefix)
        if prefix == "" or prefix.endswith("/"):
            d = self._dir(prefix)
            keys = self._call(f"list {prefix!r}", lambda: self._walk(d))
            return iter(keys)
        parent_key, partial = posixpath.split(prefix)
        parent = self._dir(parent_key)

        def run() -> list[str]:
            out: list[str] = []
            for st in self._list_dir(parent):
                name = posixpath.basename(st.path)
                if not name.startswith(partial) or name.startswith(TMP_PREFIX):
                    continue
                child = posixpath.join(parent, name)
                if st.isdir:
                    out.extend(self._walk(child))
                else:
                    out.append(self._rel(child))
            return out

        return iter(self._call(f"list {prefix!r}", run))

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Child directories of the directory ``prefix`` that hold an object, from one listing per child.

        A child is checked with a recursive listing that stops at its first object, so empty directories
        (left behind by ``delete``) and directories holding only temporaries are not listed.
        """
        d = self._dir(prefix)

        def run() -> builtins.list[str]:
            children = [st for st in self._list_dir(d) if st.isdir]
            names = [posixpath.basename(st.path) for st in children]
            return sorted(n for n in names if self._holds_object(posixpath.join(d, n)))

        return self._call(f"list_dirs {prefix!r}", run)

    def _holds_object(self, d: str) -> bool:
        try:
            for st in self._client.list_status(d, True):
                if not st.isdir and not posixpath.basename(st.path).startswith(TMP_PREFIX):
                    return True
        except (FileNotFoundError, NotADirectoryError):
            pass
        return False

    # --- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """Drop the client (hdfs-native closes its connections when it is collected)."""
        # hdfs-native has no explicit close; dropping the client closes its connections.
        self._client = None
        self._calls.shutdown(wait=False)  # a call stuck on a frozen NameNode is not waited for
