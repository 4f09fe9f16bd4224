"""S3 tier backend on ``pyarrow.fs.S3FileSystem`` (AWS S3 or any S3-compatible server).

URL form: ``s3://bucket/prefix``. Keys are object names below ``prefix/``.

Why these choices:

* One object = one S3 object. ``put`` streams the given buffers into pyarrow's S3 output stream, which sends
  an object smaller than one part as a single PutObject and a larger one as a multipart upload (parts
  uploaded in the background while the next buffers are handed over). S3 makes an object visible whole or
  not at all (PutObject, CompleteMultipartUpload), so a process killed mid-upload leaves no partial object:
  at most an unfinished multipart upload, which the server never lists (a bucket lifecycle rule
  ``AbortIncompleteMultipartUpload`` reclaims its space; pyarrow exposes no call to list or abort them).
* pyarrow cannot abort an output stream: closing it, or dropping it, completes the upload with what was
  written. A ``put`` interrupted by an error raised in this process therefore deletes the key afterwards
  (the step is not committed yet, so nothing refers to it); ``put_atomic`` never exposes a partial object:
  a small one is a single PutObject of the joined bytes, a large one is written under a hidden temporary
  key and copied over the key server-side (CopyObject is atomic at its destination).
* The commit marker is written last (by the writer, with ``put_atomic``) and S3 is strongly consistent
  for reads and listings after a write, so a listed ``COMMIT`` means every object of the step is readable.
  ``barrier`` has nothing to do: a ``put`` is durable at the server when it returns.
* Ranged reads: ``open_input_file`` (one HEAD for the size and ETag) and ``read_at`` / ``readinto`` (one
  ranged GET). A read whose extent came from the size (a whole object, a range from or up to the end) checks
  the ETag again afterwards, and a whole-object read of an object stored by one PutObject checks the bytes'
  MD5 against its ETag; either mismatch means the object was replaced during the read, and it is read again.
  The MD5 check matters on servers whose overwrites are not atomic for concurrent readers: SeaweedFS was seen
  serving an object being replaced with the new size and zeros where its chunks were not yet written. Data
  objects are never replaced in place by asymstore (a step is written once; a retried step's leftovers are
  deleted first), so only small objects (markers, metadata) are ever read while replaced.
* Directories are implicit. pyarrow re-creates an empty ``dir/`` marker object after deleting a directory's
  last object; listings only report objects, so such markers never appear as keys, and ``delete_prefix``
  of a directory removes them with one batched delete (``DeleteObjects``) of everything under it.
* Exclusive creation (:meth:`ArrowObjectStore.create_exclusive`): pyarrow exposes no conditional write
  (``If-None-Match: *``), so the backend uses a claim protocol instead; see that method for what it
  guarantees and its limits.
* Fail fast, retry a little: connect timeout ``connect_timeout_s`` (2 s), the AWS SDK's own retries
  (``sdk_retries``, standard strategy) inside each call, and around each call a short bounded retry
  (``retries``, ``backoff_s``) of errors that mean "try again" (connection refused or reset, timeouts,
  503 SlowDown, 500 InternalError). When the server stays unreachable the call raises
  :class:`~asymstore.errors.BackendUnavailableError` naming the endpoint.

Configuration: the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``~/.aws/credentials`` and ``~/.aws/config``, instance credentials), ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for an S3-compatible server, each overridden by the backend
options ``access_key``, ``secret_key``, ``session_token``, ``region``, ``endpoint_override`` and ``scheme``
(e.g. ``Store(..., backend_options={"s3": {"endpoint_override": "127.0.0.1:8333", "scheme": "http"}})``).
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from asymstore.errors import BackendUnavailableError, ConfigError
from asymstore.retry import Backoff, is_transient_error, is_unreachable_error, retry

from .base import Buffer, ByteRange, Capabilities, ObjectStore, as_buffers, check_key, check_prefix, dir_prefix

T = TypeVar("T")

#: Basename prefix of the backend's own hidden objects (temporaries, claims); listings skip them.
HIDDEN_PREFIX = ".asymstore-"
#: Prefix of put_atomic's temporary objects.
TMP_PREFIX = HIDDEN_PREFIX + "tmp."
#: Prefix of create_exclusive's claim objects: ``.asymstore-claim.<name>.<32 hex digits>`` next to the key.
CLAIM_PREFIX = HIDDEN_PREFIX + "claim."
#: Objects up to this size are put by put_atomic as one PutObject (pyarrow sends a stream smaller than one
#: multipart part, at least 5 MiB, in one request at close).
SINGLE_PUT_BYTES = 5 << 20
#: reads of an object that is being replaced are retried this often (see ArrowObjectStore._consistent_read)
_READ_ATTEMPTS = 8

_INSTALL_HINT = "the S3 backend needs pyarrow: pip install 'asymstore[s3]' (or pip install pyarrow)"

# Substrings of pyarrow / AWS SDK error messages that mean "try again".
_TRANSIENT_MARKERS = (
    "network_connection",
    "couldn't connect",
    "could not connect",
    "connection refused",
    "connection reset",
    "connection was reset",
    "broken pipe",
    "timed out",
    "timeout",
    "curlcode: 7",
    "curlcode: 28",
    "curlcode: 52",
    "curlcode: 55",
    "curlcode: 56",
    "slowdown",
    "slow down",
    "internalerror",
    "internal error",
    "service unavailable",
    "serviceunavailable",
    "http response code 500",
    "http response code 502",
    "http response code 503",
    "http response code 504",
    "requesttimeout",
)
# Of those, the ones that mean "the server is not there".
_UNREACHABLE_MARKERS = (
    "network_connection",
    "couldn't connect",
    "could not connect",
    "connection refused",
    "curlcode: 7",
    "curlcode: 28",
    "timed out",
)


def _is_transient(exc: BaseException) -> bool:
    """Whether an S3 error is worth retrying (network, throttling, a server error)."""
    return is_transient_error(exc, _TRANSIENT_MARKERS)


def _is_unreachable(exc: BaseException) -> bool:
    return is_unreachable_error(exc, _UNREACHABLE_MARKERS)


def _is_missing(exc: BaseException) -> bool:
    """A read of something that is not an object: missing, a directory, or below an object."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    msg = str(exc).lower()
    return (
        "path does not exist" in msg
        or "not a regular file" in msg
        or "is a directory" in msg
        or "nosuchkey" in msg
        or "no such key" in msg
        or "http response code 404" in msg
    )


def _etag_of(f: Any) -> bytes | None:
    """The ETag pyarrow read with an input file's HEAD (its metadata has str or bytes keys), ``None`` if none."""
    meta = f.metadata()
    tag = meta.get("ETag", meta.get(b"ETag")) if hasattr(meta, "get") else None
    if tag is None:
        return None
    return tag if isinstance(tag, bytes) else str(tag).encode()


def _matches_etag(data: bytes, etag: bytes | None) -> bool:
    """Whether ``data`` can be the object whose ETag is ``etag``: for an object stored by one PutObject (a
    plain 32-hex-digit ETag) its MD5 must match; other ETags (multipart ``<md5>-<parts>``, none) are no check.

    This is what makes a whole-object read of a small object (commit markers, zarr metadata, written by one
    PutObject) certain to be one complete version even on a server whose overwrites are not atomic for
    concurrent readers: SeaweedFS was seen serving an object being replaced with the new size and zeros where
    its chunks were not yet written.
    """
    if etag is None:
        return True
    tag = bytes(etag).strip(b'"').decode("ascii", "replace").lower()
    if len(tag) != 32 or any(c not in "0123456789abcdef" for c in tag):
        return True
    return hashlib.md5(data, usedforsecurity=False).hexdigest() == tag


def parse_endpoint(value: str) -> tuple[str, str | None]:
    """``(host[:port], scheme or None)`` of an endpoint given as ``host:port`` or ``http(s)://host:port``."""
    value = value.strip()
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"S3 endpoint must be host:port or http(s)://host:port, got {value!r}")
        return parts.netloc, parts.scheme
    if not value or "/" in value:
        raise ConfigError(f"S3 endpoint must be host:port or http(s)://host:port, got {value!r}")
    return value, None


def parse_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix`` (``prefix`` without slashes at either end, maybe '')."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"S3 URL must look like s3://bucket/prefix, got {url!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"S3 URL takes no query or fragment (pass options as backend options): {url!r}")
    prefix = parts.path.strip("/")
    if prefix:
        check_key(prefix)
    return parts.netloc, prefix


def resolve_settings(options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``S3FileSystem`` keyword arguments for the backend options over the standard AWS environment.

    Options win over the environment; what neither gives is left to the AWS SDK's own chain (credential
    files, instance credentials). Pure: reads only ``environ``.
    """
    out: dict[str, Any] = {}
    endpoint = options.get("endpoint_override") or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    scheme = options.get("scheme")
    if endpoint:
        host, endpoint_scheme = parse_endpoint(str(endpoint))
        out["endpoint_override"] = host
        scheme = scheme or endpoint_scheme
    if scheme is not None:
        if scheme not in ("http", "https"):
            raise ConfigError(f"S3 scheme must be 'http' or 'https', got {scheme!r}")
        out["scheme"] = scheme
    region = options.get("region") or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region:
        out["region"] = region
    elif endpoint:
        # an S3-compatible server: any region signs; without one the SDK may ask the instance metadata service
        out["region"] = "us-east-1"
    access, secret = options.get("access_key"), options.get("secret_key")
    if (access is None) != (secret is None):
        raise ConfigError("S3 options access_key and secret_key go together: give both or neither")
    if access is not None:
        out["access_key"] = access
        out["secret_key"] = secret
        if options.get("session_token"):
            out["session_token"] = options["session_token"]
    return out


class ArrowObjectStore(ObjectStore):
    """Objects as files below ``root`` of a ``pyarrow.fs.FileSystem``: what the S3 backend and pyarrow's HDFS
    client share (streamed puts, ranged reads, listings that report objects only, batched deletes, bounded
    retry). Subclasses open the file system and say how ``put_atomic`` replaces an object."""

    #: service name in error messages
    service: ClassVar[str] = "pyarrow"
    #: what to check when the service is unreachable
    unreachable_hint: ClassVar[str] = "Check that the server is running."

    def __init__(
        self,
        url: str,
        fs: Any,
        root: str,
        *,
        endpoint: str,
        retries: int,
        backoff_s: float,
        max_backoff_s: float,
        claim_wait_s: float = 30.0,
    ) -> None:
        super().__init__(url)
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ConfigError("retries, backoff_s and max_backoff_s must be >= 0")
        from pyarrow import fs as pafs

        self._pafs = pafs
        self._fs: Any = fs
        self._root = root
        self.endpoint = endpoint
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.claim_wait_s = claim_wait_s

    # --- helpers ----------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return posixpath.join(self._root, check_key(key))

    def _dir(self, prefix: str) -> str:
        d = dir_prefix(prefix)
        return posixpath.join(self._root, d.rstrip("/")) if d else self._root

    def _rel(self, path: str) -> str:
        return path[len(self._root) + 1 :]

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with bounded retry of transient errors; "server gone" becomes BackendUnavailableError."""

        def give_up(e: BaseException, attempts: int, elapsed: float) -> BaseException:
            if _is_unreachable(e):
                return BackendUnavailableError(
                    f"{self.service} at {self.endpoint} is unreachable ({what} on {self.url} failed {attempts} "
                    f"times in {elapsed:.1f} s: {e}). {self.unreachable_hint}"
                )
            return BackendUnavailableError(
                f"{self.service} at {self.endpoint}: {what} on {self.url} failed {attempts} times in "
                f"{elapsed:.1f} s with a transient error: {e}"
            )

        backoff = Backoff(initial_s=self.backoff_s, max_s=self.max_backoff_s, factor=2.0)
        return retry(fn, retries=self.retries, transient=_is_transient, backoff=backoff, give_up=give_up)

    def _write_object(self, path: str, bufs: list[memoryview], *, delete_on_error: bool = True) -> None:
        """Stream ``bufs`` into one object; an error raised while writing deletes the object that pyarrow
        completes anyway when the stream is closed (``delete_on_error=False``: one buffer smaller than a part,
        which pyarrow sends in one request at close, so nothing partial can be sent)."""
        out = self._fs.open_output_stream(path)
        try:
            for b in bufs:
                if len(b):
                    out.write(b)
        except BaseException:
            try:
                out.close()
            except Exception:
                pass
            if delete_on_error:
                try:
                    self._fs.delete_file(path)
                except Exception:
                    pass
            raise
        out.close()

    # --- writes -----------------------------------------------------------------------
    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write ``key`` as one object (PutObject, or a multipart upload for one larger than a part)."""
        path = self._path(key)
        bufs = as_buffers(data)
        self._call(f"put {key!r}", lambda: self._write_object(path, bufs))

    def create_exclusive(self, key: str, data: Buffer | Sequence[Buffer]) -> bool:
        """Create ``key`` only if no object ``key`` exists; True if this call created it.

        pyarrow exposes no conditional PUT (``If-None-Match: *``), so this is a claim protocol on plain
        PUT, LIST and DELETE: each writer checks that ``key`` is absent, writes a claim object of its own
        (``.asymstore-claim.<name>.<token>`` next to the key: a unique name, so no write replaces another's)
        and lists the claims of ``key``. A writer that sees only its own claim and, after that listing, still
        no ``key`` wins: it writes ``key`` with :meth:`put_atomic`, then withdraws its claim. A writer that
        sees other claims withdraws its own and waits until ``key`` appears (False) or the other claims are
        withdrawn (it tries again), for at most ``claim_wait_s``.

        At most one writer wins, whatever the timing, given listings that are strongly consistent after
        writes and deletes (AWS S3 since December 2020; the SeaweedFS filer): of two overlapping claims the
        one written later is seen by its writer's listing, and a claim withdrawn by a winner is withdrawn only
        after ``key`` exists, which the later writer's check after its listing then sees. Limits: it costs
        about five requests more than a conditional PUT, so it is meant for claims and commit markers, not
        data; a writer that dies holding a claim blocks the key for ``claim_wait_s`` (then
        :class:`~asymstore.errors.BackendUnavailableError` names the claim; :meth:`remove_temporaries`
        removes it once it is old); writers that use plain ``put`` on the key are not excluded.
        """
        path = self._path(key)
        bufs = as_buffers(data)
        parent, name = posixpath.split(path)
        deadline = time.monotonic() + self.claim_wait_s
        backoff = Backoff(initial_s=0.01, max_s=0.25, factor=2.0)
        while True:
            if self.exists(key):
                return False
            token = uuid.uuid4().hex
            mine = posixpath.join(parent, f"{CLAIM_PREFIX}{name}.{token}")
            claim = memoryview(token.encode())
            self._call(f"claim {key!r}", functools.partial(self._write_object, mine, [claim]))
            try:
                others = [c for c in self._claims(parent, name) if c != mine]
                if not others and not self.exists(key):
                    self.put_atomic(key, bufs)
                    return True
            finally:
                self._call(f"withdraw claim on {key!r}", functools.partial(self._delete_object, mine))
            while True:
                if self.exists(key):
                    return False
                pending = self._claims(parent, name)
                if not pending:
                    break
                if time.monotonic() > deadline:
                    raise BackendUnavailableError(
                        f"create_exclusive {key!r} on {self.url}: claims {pending} are still there after "
                        f"{self.claim_wait_s:.0f} s and {key!r} was not created; a writer died while creating it. "
                        "Delete those claim objects (remove_temporaries does once they are old), then try again."
                    )
                time.sleep(backoff.next() * (0.5 + random.random()))

    def remove_temporaries(self, prefix: str, *, older_than_s: float = 0.0) -> int:
        """Delete the hidden temporaries and claims lying directly in the directory ``prefix`` that were not
        modified for ``older_than_s`` seconds (by the server's clock, from their Last-Modified time)."""
        d = self._dir(prefix)

        def run() -> int:
            sel = self._pafs.FileSelector(d, recursive=False, allow_not_found=True)
            now = time.time()
            n = 0
            for info in self._fs.get_file_info(sel):
                if info.type != self._pafs.FileType.File:
                    continue
                if not posixpath.basename(info.path).startswith(HIDDEN_PREFIX):
                    continue
                mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
                if now - mtime < older_than_s:
                    continue
                self._delete_object(info.path)
                n += 1
            return n

        return self._call(f"remove_temporaries {prefix!r}", run)

    def _claims(self, parent: str, name: str) -> list[str]:
        """Paths of the claim objects of ``name`` in the directory ``parent``."""
        head = f"{CLAIM_PREFIX}{name}."

        def run() -> list[str]:
            sel = self._pafs.FileSelector(parent, recursive=False, allow_not_found=True)
            out = []
            for info in self._fs.get_file_info(sel):
                base = posixpath.basename(info.path)
                token = base[len(head) :]
                if base.startswith(head) and len(token) == 32 and all(c in "0123456789abcdef" for c in token):
                    out.append(info.path)
            return out

        return self._call("list claims", run)

    def _delete_object(self, path: str) -> None:
        try:
            self._fs.delete_file(path)
        except OSError as e:
            if not _is_missing(e):
                raise

    def delete(self, key: str) -> None:
        """Delete the object of ``key`` if present."""
        path = self._path(key)
        self._call(f"delete {key!r}", lambda: self._delete_object(path))

    def delete_prefix(self, prefix: str) -> int:
        """Remove everything under ``prefix``: a directory prefix with one batched delete of the directory
        (hidden objects and markers included), a partial name by deleting what matches it."""
        check_prefix(prefix)
        if prefix == "" or prefix.endswith("/"):
            d = self._dir(prefix)

            def run() -> int:
                n = len(self._walk(d))
                hidden = self._walk(d, hidden=True)
                if not hidden:
                    return 0
                if d == self._root:
                    self._fs.delete_dir_contents(d, missing_dir_ok=True)
                else:
                    try:
                        self._fs.delete_dir(d)
                    except OSError as e:
                        if not _is_missing(e):
                            raise
                return n

            return self._call(f"delete_prefix {prefix!r}", run)
        parent_key, partial = posixpath.split(prefix)
        parent = self._dir(parent_key)

        def run_partial() -> int:
            n = 0
            sel = self._pafs.FileSelector(parent, recursive=False, allow_not_found=True)
            for info in self._fs.get_file_info(sel):
                name = posixpath.basename(info.path)
                if not name.startswith(partial):
                    continue
                if info.type == self._pafs.FileType.Directory:
                    n += len(self._walk(info.path))
                    try:
                        self._fs.delete_dir(info.path)
                    except OSError as e:
                        if not _is_missing(e):
                            raise
                elif info.type == self._pafs.FileType.File:
                    self._delete_object(info.path)
                    n += 0 if name.startswith(HIDDEN_PREFIX) else 1
            return n

        return self._call(f"delete_prefix {prefix!r}", run_partial)

    # --- reads ------------------------------------------------------------------------
    def _open(self, path: str) -> Any:
        try:
            return self._fs.open_input_file(path)
        except OSError as e:
            if _is_missing(e):
                return None
            raise

    def _etag(self, path: str) -> bytes | None:
        """The object's ETag (one HEAD), ``None`` if it is gone."""
        f = self._open(path)
        if f is None:
            return None
        with f:
            tag = _etag_of(f)
        return None if tag is None else bytes(tag)

    def _consistent_read(self, key: str, path: str, read: Callable[[Any], tuple[T | None, bool]]) -> T | None:
        """Run ``read(file)`` on the opened object and return its value; ``None`` if there is no object.

        ``read`` returns ``(value, sized)``: ``value`` ``None`` means "read again" (fewer bytes came than the
        HEAD promised: the object was replaced), ``sized`` that the read's extent came from the object's size
        (a whole object, a range from the end or clamped at the end). A GET returns one version of an object
        whole, but the size that shaped it may be the previous version's, so a sized read re-checks the ETag
        afterwards and reads again if it changed (at most ``_READ_ATTEMPTS`` times). Not caught: the object
        replaced twice during one GET, the second time by the same bytes as before.
        """
        for _ in range(_READ_ATTEMPTS):
            f = self._open(path)
            if f is None:
                return None
            with f:
                before = _etag_of(f)
                value, sized = read(f)
            if value is None:
                continue
            if not sized or before is None or self._etag(path) == bytes(before):
                return value
        raise OSError(f"{key}: the object kept changing while it was read ({_READ_ATTEMPTS} attempts)")

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | None:
        """Read the object: one HEAD for its size, one GET of the range :meth:`ByteRange.resolve` gives (and
        one more HEAD when that range depended on the size, see :meth:`_consistent_read`)."""
        path = self._path(key)

        def read(f: Any) -> tuple[bytes | None, bool]:
            size = f.size()
            start, stop = (0, size) if byte_range is None else byte_range.resolve(size)
            sized = byte_range is None or byte_range.start < 0 or byte_range.start + byte_range.length >= size
            if stop == start:
                return b"", sized
            data = bytes(f.read_at(stop - start, start))
            if len(data) != stop - start:
                return None, sized
            if byte_range is None and not _matches_etag(data, _etag_of(f)):
                return None, sized  # not the bytes the HEAD described: replaced meanwhile, read again
            return data, sized

        return self._call(f"get {key!r}", lambda: self._consistent_read(key, path, read))

    def get_into(self, key: str, out: memoryview, offset: int = 0) -> bool:
        """Read ``len(out)`` bytes at ``offset`` straight into ``out`` (one ranged GET, no temporary)."""
        path = self._path(key)
        out = memoryview(out).cast("B")
        want = len(out)

        def read(f: Any) -> tuple[bool | None, bool]:
            size = f.size()
            start, stop = ByteRange(offset, want).resolve(size)
            if stop - start != want:
                raise EOFError(f"{key}: wanted {want} bytes at {offset}, object has {size}")
            pos = 0
            f.seek(start)
            while pos < want:
                n = f.readinto(out[pos:])
                if not n:
                    return None, offset < 0  # shorter than its HEAD said: replaced meanwhile, read again
                pos += n
            return True, offset < 0

        return self._call(f"get_into {key!r}", lambda: self._consistent_read(key, path, read) is not None)

    def size(self, key: str) -> int | None:
        """Size of the object (one HEAD), ``None`` if missing or a directory."""
        path = self._path(key)

        def run() -> int | None:
            info = self._fs.get_file_info(path)
            return int(info.size) if info.type == self._pafs.FileType.File else None

        return self._call(f"size {key!r}", run)

    def _walk(self, d: str, *, hidden: bool = False) -> list[str]:
        """Keys of every object below the directory path ``d`` (one paged listing); ``hidden``: with the
        backend's temporaries and claims."""
        sel = self._pafs.FileSelector(d, recursive=True, allow_not_found=True)
        try:
            infos = self._fs.get_file_info(sel)
        except OSError as e:
            if _is_missing(e):
                return []
            raise
        File = self._pafs.FileType.File
        return [
            self._rel(i.path)
            for i in infos
            if i.type == File and (hidden or not posixpath.basename(i.path).startswith(HIDDEN_PREFIX))
        ]

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with ``prefix``: one recursive listing of the deepest directory covering it."""
        check_prefix(prefix)
        if prefix == "" or prefix.endswith("/"):
            d = self._dir(prefix)
            return iter(self._call(f"list {prefix!r}", lambda: self._walk(d)))
        parent_key = posixpath.dirname(prefix)
        parent = self._dir(parent_key)
        keys = self._call(f"list {prefix!r}", lambda: self._walk(parent))
        return iter([k for k in keys if k.startswith(prefix)])

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Child directories of ``prefix`` that hold an object (from one recursive listing)."""
        d = dir_prefix(prefix)
        names = {k[len(d) :].split("/", 1)[0] for k in self.list(d) if "/" in k[len(d) :]}
        return sorted(names)

    # --- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to release now: pyarrow file systems have no close; their connection pools go when the
        backend is collected (so a call after ``close`` still works, as on the local backend)."""


class S3ObjectStore(ArrowObjectStore):
    """Objects under ``s3://bucket/prefix`` through ``pyarrow.fs.S3FileSystem``.

    Keyword-only options:

    * ``endpoint_override``, ``scheme``, ``region``, ``access_key``, ``secret_key``, ``session_token``: see the
      module docstring (default: the standard AWS environment and configuration chain).
    * ``connect_timeout_s`` (2) and ``request_timeout_s`` (30): socket timeouts handed to the AWS SDK
      (pyarrow documents the request timeout as effective on Windows and macOS only).
    * ``sdk_retries`` (2): attempts of the AWS SDK's standard retry strategy within one call.
    * ``retries`` (3), ``backoff_s`` (0.2, doubling) and ``max_backoff_s`` (2): the bounded retry around each
      call; with the defaults a server that refuses connections is reported after about 1.5 s.
    * ``create_bucket`` (False): create the bucket if it does not exist (tests, private servers).
    * ``claim_wait_s`` (30): how long :meth:`create_exclusive` waits for a competing claim to resolve.
    * ``background_writes`` (True): pyarrow uploads multipart parts in the background while ``put`` goes on.
    """

    capabilities = Capabilities(durable=True, volatile=False, atomic_rename=False, ranged_reads=True)
    service = "S3"
    unreachable_hint = (
        "Check the endpoint (backend option endpoint_override or AWS_ENDPOINT_URL_S3) and that the server is running."
    )

    def __init__(
        self,
        url: str,
        *,
        endpoint_override: str | None = None,
        scheme: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        connect_timeout_s: float = 2.0,
        request_timeout_s: float = 30.0,
        sdk_retries: int = 2,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_backoff_s: float = 2.0,
        create_bucket: bool = False,
        claim_wait_s: float = 30.0,
        background_writes: bool = True,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        if sdk_retries < 1:
            raise ConfigError("sdk_retries must be >= 1")
        if connect_timeout_s <= 0 or request_timeout_s <= 0:
            raise ConfigError("connect_timeout_s and request_timeout_s must be positive")
        try:
            from pyarrow import fs as pafs
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise BackendUnavailableError(f"{url}: {_INSTALL_HINT}") from e
        options = {
            "endpoint_override": endpoint_override,
            "scheme": scheme,
            "region": region,
            "access_key": access_key,
            "secret_key": secret_key,
            "session_token": session_token,
        }
        self.settings = resolve_settings(options, os.environ)
        fs = pafs.S3FileSystem(
            **self.settings,
            connect_timeout=connect_timeout_s,
            request_timeout=request_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=sdk_retries),
            background_writes=background_writes,
            allow_delayed_open=True,
            allow_bucket_creation=create_bucket,
        )
        root = posixpath.join(self.bucket, self.prefix) if self.prefix else self.bucket
        endpoint = self.settings.get("endpoint_override", "the AWS S3 endpoint")
        super().__init__(
            url,
            fs,
            root,
            endpoint=endpoint,
            retries=retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            claim_wait_s=claim_wait_s,
        )
        self._check_bucket(create_bucket)

    def _check_bucket(self, create: bool) -> None:
        def run() -> Any:
            return self._fs.get_file_info(self.bucket)

        info = self._call("open bucket", run)
        if info.type == self._pafs.FileType.NotFound:
            if not create:
                raise BackendUnavailableError(
                    f"S3 bucket {self.bucket!r} does not exist at {self.endpoint} ({self.url}); create it, or pass "
                    "backend option create_bucket=True"
                )
            self._call("create bucket", lambda: self._fs.create_dir(self.bucket))

    def put_atomic(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Replace ``key`` so readers see the old or the whole new object, never a part.

        Up to :data:`SINGLE_PUT_BYTES`: one PutObject of the joined bytes. Larger: a hidden temporary object,
        copied over ``key`` on the server (CopyObject), then deleted.
        """
        path = self._path(key)
        bufs = as_buffers(data)
        total = sum(len(b) for b in bufs)
        if total <= SINGLE_PUT_BYTES:
            joined = b"".join(bufs)
            one = [memoryview(joined)]
            self._call(f"put_atomic {key!r}", lambda: self._write_object(path, one, delete_on_error=False))
            return
        parent, name = posixpath.split(path)

        def attempt() -> None:
            tmp = posixpath.join(parent, f"{TMP_PREFIX}{name}.{uuid.uuid4().hex}")
            try:
                self._write_object(tmp, bufs)
                if self._fs.get_file_info(tmp).size != total:
                    raise OSError(f"temporary object {tmp} is not {total} bytes long after its upload")
                self._fs.copy_file(tmp, path)
            finally:
                try:
                    self._fs.delete_file(tmp)
                except Exception:
                    pass

        self._call(f"put_atomic {key!r}", attempt)


def find_libhdfs() -> str | None:
    """Where pyarrow's HDFS client would load ``libhdfs.so`` from (``ARROW_LIBHDFS_DIR``,
    ``$HADOOP_HOME/lib/native``, the system library path), ``None`` when it is absent."""
    import ctypes.util

    for d in (os.environ.get("ARROW_LIBHDFS_DIR"), os.path.join(os.environ.get("HADOOP_HOME", ""), "lib", "native")):
        if d and os.path.isfile(os.path.join(d, "libhdfs.so")):
            return os.path.join(d, "libhdfs.so")
    return ctypes.util.find_library("hdfs")


class PyArrowHdfsObjectStore(ArrowObjectStore):
    """``hdfs://host:port/root`` through pyarrow's ``HadoopFileSystem`` (libhdfs and a JVM), the alternative to
    the default hdfs-native client: ``open_object_store(url, client="pyarrow")``.

    Needs ``libhdfs.so`` (``ARROW_LIBHDFS_DIR`` or ``$HADOOP_HOME/lib/native``), ``JAVA_HOME`` and the Hadoop
    jars on ``CLASSPATH`` (``hadoop classpath --glob``); without libhdfs opening raises
    :class:`~asymstore.errors.BackendUnavailableError` saying so. ``put_atomic`` writes a hidden temporary file
    and renames it over the key; pyarrow replaces an existing file by delete + rename (libhdfs has no rename
    with overwrite), so while a key is *replaced* a reader can find it missing for a moment (never partial).
    Options: ``retries``, ``backoff_s``, ``max_backoff_s`` as for the other backends; ``replication`` (3) and
    ``block_size`` (cluster default) per file; ``user``; ``extra_conf`` (Hadoop client settings); ``claim_wait_s``
    for :meth:`ArrowObjectStore.create_exclusive` (pyarrow's HDFS move overwrites, so the claim protocol is used).
    """

    capabilities = Capabilities(durable=True, volatile=False, atomic_rename=True, ranged_reads=True)
    service = "HDFS"
    unreachable_hint = "Check that the NameNode is running and that host and port match its fs.defaultFS."

    def __init__(
        self,
        url: str,
        *,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 4.0,
        replication: int = 3,
        block_size: int | None = None,
        user: str | None = None,
        extra_conf: dict[str, str] | None = None,
        claim_wait_s: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "hdfs" or not parts.hostname:
            raise ConfigError(f"HDFS URL must look like hdfs://host:port/path, got {url!r}")
        try:
            from pyarrow import fs as pafs
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise BackendUnavailableError(f"{url}: {_INSTALL_HINT}") from e
        if find_libhdfs() is None:
            raise BackendUnavailableError(
                f"{url}: pyarrow's HDFS client needs libhdfs.so and a JVM, and no libhdfs.so was found (set "
                "ARROW_LIBHDFS_DIR or HADOOP_HOME, JAVA_HOME, and CLASSPATH from `hadoop classpath --glob`), or "
                "use the default client (hdfs-native, no JVM): drop the option client='pyarrow'"
            )
        root = "/" + parts.path.strip("/") if parts.path.strip("/") else "/"
        fs = pafs.HadoopFileSystem(
            parts.hostname,
            parts.port or 8020,
            user=user,
            replication=replication,
            default_block_size=block_size,
            extra_conf=extra_conf,
        )
        super().__init__(
            url,
            fs,
            root.rstrip("/") or "/",
            endpoint=f"{parts.hostname}:{parts.port or 8020}",
            retries=retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            claim_wait_s=claim_wait_s,
        )

    def _rel(self, path: str) -> str:
        # HadoopFileSystem reports absolute paths, with or without the hdfs://host:port prefix
        if "://" in path:
            path = "/" + path.split("://", 1)[1].split("/", 1)[-1]
        return path.lstrip("/") if self._root == "/" else path[len(self._root) + 1 :]

    def put_atomic(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write a hidden temporary file next to ``key`` and rename it over ``key``."""
        path = self._path(key)
        bufs = as_buffers(data)
        parent, name = posixpath.split(path)

        def attempt() -> None:
            tmp = posixpath.join(parent, f"{TMP_PREFIX}{name}.{uuid.uuid4().hex}")
            try:
                self._write_object(tmp, bufs)
                self._fs.move(tmp, path)
            except BaseException:
                try:
                    self._fs.delete_file(tmp)
                except Exception:
                    pass
                raise

        self._call(f"put_atomic {key!r}", attempt)


__all__ = [
    "CLAIM_PREFIX",
    "HIDDEN_PREFIX",
    "TMP_PREFIX",
    "ArrowObjectStore",
    "PyArrowHdfsObjectStore",
    "S3ObjectStore",
    "find_libhdfs",
    "parse_endpoint",
    "parse_s3_url",
]
