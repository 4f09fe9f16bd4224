"""Lightning ``CheckpointIO`` plugins storing checkpoints in asymstore.

::

    store = asymstore.open_store("/nvme/ckpt")
    trainer = L.Trainer(plugins=[AsymstoreCheckpointIO(store)],            # or AsyncAsymstoreCheckpointIO
                        callbacks=[ModelCheckpoint(dirpath="ckpts", save_last=True)])
    trainer.fit(model)
    trainer.fit(model, ckpt_path="ckpts/last.ckpt")                        # resume

Paths and steps. Every ``save_checkpoint`` is a new asymstore step (a save counter: the
store's newest step + 1; Lightning may save two paths at one ``global_step``, e.g. a top-k
file and ``last.ckpt``). The Lightning path is recorded in the step's manifest
(``user["lightning"]``: path, epoch, global_step) and, once the step is committed, a small
JSON *pointer file* is written at the path itself (``{"format": "asymstore-lightning/1",
"store": <tier url>, "step": N}``, temporary name + rename), so Lightning's own file logic
works unchanged (``ModelCheckpoint``'s existence checks and top-k bookkeeping,
``ckpt_path="last"``). ``load_checkpoint(path)`` reads the pointer, or without one finds the
newest step whose manifest names ``path``; ``remove_checkpoint(path)`` deletes the step and the
pointer. Saving to a path that already points at a step replaces it (the old step is deleted
after the new one is committed). ``pointer_files=False`` keeps everything in the store.

Values. The checkpoint dict is stored as asymstore state: tensors as zarr arrays, everything
else as JSON (numbers, strings, lists, tuples, dicts incl. non-string keys, numpy scalars,
torch dtypes). ``hyper_parameters`` (an ``AttributeDict``) comes back as a plain dict. Anything
else (an arbitrary object in ``hyper_parameters``, a callback state holding a custom class)
raises :class:`~asymstore.errors.UnsupportedValueError` naming the key path; asymstore never
pickles, so ``load_checkpoint(weights_only=...)`` is always safe.

:class:`AsyncAsymstoreCheckpointIO` returns once the checkpoint is copied into a host
snapshot slot (a point-in-time copy: training may change the tensors right away) and
persists it in the background; the pointer file appears when the step is committed. As with
Lightning's ``AsyncCheckpointIO``, a background error is re-raised on the next call
(``save``/``load``/``remove``/``teardown``), never swallowed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from asymstore.errors import AsymstoreError, CheckpointFailedError, StepNotFoundError, UnsupportedValueError
from asymstore.files import atomic_file
from asymstore.state import flatten
from asymstore.store import SaveHandle, Store, open_store

log = logging.getLogger("asymstore.lightning")

__all__ = ["AsymstoreCheckpointIO", "AsyncAsymstoreCheckpointIO"]

POINTER_FORMAT = "asymstore-lightning/1"
_POINTER_MAX = 4096


class AsymstoreCheckpointIO(CheckpointIO):
    """Synchronous: ``save_checkpoint`` returns once the step is committed on the first tier."""

    def __init__(self, store: Store | str, *, pointer_files: bool = True, **store_options: Any) -> None:
        self._owns_store = not isinstance(store, Store)
        self.store = store if isinstance(store, Store) else open_store(store, **store_options)
        self.pointer_files = pointer_files
        self._lock = threading.Lock()
        self._next: int | None = None

    # --- paths <-> steps -------------------------------------------------------------
    @property
    def url(self) -> str:
        """The first persistent tier's URL (recorded in pointer files), ``"memory"`` without one."""
        return next(iter(self.store.tier_urls.values()), "memory")

    def _new_step(self) -> int:
        with self._lock:
            if self._next is None:
                latest = self.store.latest_step()
                self._next = 0 if latest is None else latest + 1
            step, self._next = self._next, self._next + 1
            return step

    def _read_pointer(self, path: str) -> int | None:
        fs = get_filesystem(path)
        try:
            if not fs.isfile(path) or fs.size(path) > _POINTER_MAX:
                return None
            with fs.open(path, "rb") as f:
                doc = json.loads(f.read())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("format") != POINTER_FORMAT:
            return None
        return int(doc["step"])

    def _write_pointer(self, path: str, step: int) -> None:
        body = json.dumps({"format": POINTER_FORMAT, "store": self.url, "step": step}).encode()
        fs = get_filesystem(path)
        if isinstance(fs, LocalFileSystem):
            with atomic_file(os.path.abspath(path)) as out:
                out.write(body)
            return
        parent = os.path.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"  # another filesystem: its own temporary name + rename
        with fs.open(tmp, "wb") as f:
            f.write(body)
        fs.mv(tmp, path)

    def _find_step(self, path: str) -> int:
        step = self._read_pointer(path)
        if step is not None:
            return step
        for s in reversed(self.store.steps()):  # no pointer: the newest step whose manifest names the path
            try:
                meta = self.store.open_checkpoint(s).user.get("lightning", {})
            except AsymstoreError:
                continue
            if meta.get("path") == path:
                return s
        raise FileNotFoundError(
            f"no asymstore checkpoint for {path!r} (no pointer file, and no step of "
            f"{self.url} was saved under that path)"
        )

    # --- CheckpointIO ----------------------------------------------------------------
    def _prepare(self, checkpoint: dict[str, Any], path: str) -> tuple[Any, int, dict[str, Any]]:
        try:
            flat = flatten(checkpoint)
        except UnsupportedValueError as e:
            raise UnsupportedValueError(
                f"Lightning checkpoint for {path}: key {e} - asymstore stores tensors and JSON values only (never "
                "pickle); convert the value (e.g. save_hyperparameters(ignore=[...]) or a state_dict())"
            ) from e
        step = self._new_step()
        user = {
            "lightning": {"path": path, "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}
        }
        return flat, step, user

    def _after_commit(self, path: str, step: int, replaced: int | None) -> None:
        if self.pointer_files:
            self._write_pointer(path, step)
        if replaced is not None and replaced != step and replaced in self.store.steps():
            try:
                self.store.delete(replaced)
            except AsymstoreError as e:
                log.warning("could not delete step %s replaced by %s at %s: %s", replaced, step, path, e)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` as a new step; returns once it is committed, then writes the pointer file."""
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} does not take storage_options (got {storage_options!r}); "
                "configure the store instead"
            )
        path = os.fspath(path)
        flat, step, user = self._prepare(checkpoint, path)
        replaced = self._read_pointer(path) if self.pointer_files else None
        self.store.save(flat, step, user=user)
        self._after_commit(path, step, replaced)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Restore the checkpoint saved under ``path`` (``weights_only`` is moot: nothing is unpickled)."""
        path = os.fspath(path)
        step = self._find_step(path)
        try:
            state = self.store.restore(step)
        except StepNotFoundError as e:
            raise FileNotFoundError(f"{path} points at step {step} of {self.url}, which is gone: {e}") from e
        out: dict[str, Any] = _map_location(state, map_location)
        return out

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the step saved under ``path`` and its pointer file."""
        path = os.fspath(path)
        step = self._read_pointer(path)
        if step is None and not self.pointer_files:
            try:
                step = self._find_step(path)
            except FileNotFoundError:
                step = None
        if step is not None and step in self.store.steps():
            self.store.delete(step)
        fs = get_filesystem(path)
        if step is not None and fs.exists(path):
            fs.rm(path)

    def teardown(self) -> None:
        """End of a fit/validate: wait until every checkpoint is durable (and promoted down the tier
        chain, bounded by ``close_timeout_s``); re-raises a background failure. The plugin stays usable
        (Lightning tears down after every stage); :meth:`close` closes a store this plugin opened."""
        if not self.store.flush(self.store.config.close_timeout_s):
            log.warning("teardown: promotions still pending down the tier chain (see store.status())")

    def close(self) -> None:
        """Tear down, and close the store if this plugin opened it."""
        self.teardown()
        if self._owns_store:
            self.store.close()


class AsyncAsymstoreCheckpointIO(AsymstoreCheckpointIO):
    """``save_checkpoint`` returns after the host snapshot copy; persistence runs in the background.

    A background failure is re-raised (once) by the next ``save``/``load``/``remove``/``teardown``.
    """

    def __init__(self, store: Store | str, *, pointer_files: bool = True, **store_options: Any) -> None:
        super().__init__(store, pointer_files=pointer_files, **store_options)
        self._pending: dict[str, tuple[SaveHandle, threading.Event]] = {}  # path -> its save in flight
        self._error: BaseException | None = None

    def _raise_error(self) -> None:
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            self.store.forget_background_error(err)  # delivered here, once: the store must not raise it again
            raise CheckpointFailedError(f"a background Lightning checkpoint failed: {err}") from err

    def _wait_path(self, path: str) -> None:
        item = self._pending.get(path)
        if item is not None:
            item[1].wait()

    def _wait_all(self) -> None:
        for _, done in list(self._pending.values()):
            done.wait()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Copy ``checkpoint`` into a host slot and persist it in the background; the pointer follows the commit."""
        self._raise_error()
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options (got {storage_options!r})")
        path = os.fspath(path)
        self._wait_path(path)  # one save per path at a time (the pointer is replaced in order)
        flat, step, user = self._prepare(checkpoint, path)
        replaced = self._read_pointer(path) if self.pointer_files else None
        handle = self.store.save(flat, step, user=user, blocking=False)  # snapshot copied before return
        done = threading.Event()

        def finished(_fut: Any) -> None:
            try:
                handle.result()
                self._after_commit(path, step, replaced)
            except BaseException as e:
                with self._lock:
                    self._error = self._error or e
            finally:
                with self._lock:
                    if self._pending.get(path, (None,))[0] is handle:
                        del self._pending[path]
                done.set()

        with self._lock:
            self._pending[path] = (handle, done)
        handle.add_done_callback(finished)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Wait for saves in flight (re-raising a failure), then load as the synchronous plugin does."""
        self._wait_all()
        self._raise_error()
        return super().load_checkpoint(path, map_location, weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        """Wait for a save to ``path`` in flight, then delete it as the synchronous plugin does."""
        self._raise_error()
        self._wait_path(os.fspath(path))
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        """Wait for every save in flight, re-raise a failure, then tear down as the synchronous plugin does."""
        self._wait_all()
        try:
            self._raise_error()
        finally:
            super().teardown()


def _map_location(state: Any, map_location: Any) -> Any:
    """Move restored (CPU) tensors: ``map_location`` as a device, a device string, or {"cpu": device}."""
    if map_location is None:
        return state
    if isinstance(map_location, dict):
        map_location = map_location.get("cpu")
    if callable(map_location) or map_location is None:
        log.warning("map_location=%r is not supported by asymstore; tensors stay on the CPU", map_location)
        return state
    dev = torch.device(map_location)
    if dev.type == "cpu":
        return state

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(dev)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return v

    return move(state)
