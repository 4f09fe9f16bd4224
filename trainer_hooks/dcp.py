"""torch.distributed.checkpoint (DCP) storage on asymstore tiers.

``AsymStorageWriter`` and ``AsymStorageReader`` let ``dcp.save``, ``dcp.async_save`` and
``dcp.load`` target an asymstore tier chain, while DCP's planners do the (re)sharding::

    from asymstore.trainer_hooks.dcp import AsymStorageReader, AsymStorageWriter
    dcp.save(state, storage_writer=AsymStorageWriter("/ckpt", step=100))
    dcp.load(state, storage_reader=AsymStorageReader("/ckpt", step=100))   # any world size
    # or a checkpoint id "<tier url>/step_<N>":
    dcp.save(state, storage_writer=AsymStorageWriter(), checkpoint_id="/ckpt/step_100")

Mapping. A DCP checkpoint is one asymstore *step* of the store at the URL (a tier chain:
``"/nvme/ckpt"`` or ``["/nvme/ckpt", "hdfs://nn:8020/ckpt"]``). Each DCP rank's write items
(tensor chunks and bytes items) become that rank's part of the step, in its rank directory (``step_X/rNNNNN``
for several ranks), named ``<fqn>@<chunk offsets>`` (tensors) or ``<fqn>`` (bytes). DCP's
``Metadata`` (state-dict metadata, planner data, where each item lives) is serialized as
**JSON** into the manifest of rank 0's part (``user["dcp"]``); rank 0 writes the step's
global commit marker only after every rank's directory is durable, so a checkpoint is visible
only when complete, and it moves down the tier chain like any other step.

Phases of :class:`AsymStorageWriter`, in order (DCP's calls):

1. ``reset(checkpoint_id)`` (all ranks): parse ``<url>/step_<N>`` if given.
2. ``set_up_storage_writer`` (all ranks): remember the role.
3. ``prepare_local_plan`` (all ranks): nothing to change.
4. ``prepare_global_plan`` (coordinator): choose the step (given, or the newest + 1),
   refuse one already committed, and tell every rank its rank index and the world size
   through ``SavePlan.storage_data``.
5. ``write_data`` (all ranks): ranks > 0 save their items as their part of the step, blocking until
   durable; the coordinator (rank 0) only resolves its items and holds them.
6. ``finish`` (coordinator): serialize ``Metadata`` as JSON and save rank 0's part with it;
   asymstore then commits the step globally (after all rank directories are durable).

Rank 0 writes its part in ``finish`` because DCP's ``Metadata`` only exists there and
asymstore's commit marker must vouch for it; with N ranks, rank 0's bytes are written after
the others' (not concurrently).

Bytes items and pickle. asymstore's own metadata is pickle-free (JSON). DCP itself turns
every non-tensor value of a state dict into a bytes item with ``torch.save`` (pickle), and
``DefaultLoadPlanner`` loads them with ``torch.load(weights_only=False)``, which can run code.
asymstore stores those bytes verbatim as uint8 tensors (checksummed like everything else)
but cannot make them safe; load untrusted checkpoints with :class:`WeightsOnlyLoadPlanner`,
or keep non-tensor values out of DCP state dicts.

Not supported: ``use_collectives=False`` (per-rank metadata), a coordinator other than
rank 0 of the process group.

DCP's own tools. ``dcp.load(state, checkpoint_id=ID)`` without a storage reader only tries DCP's built-in
readers (the list is fixed in torch), so pass ``storage_reader=AsymStorageReader()`` (the id still names tier and
step); ``format_utils.dcp_to_torch_save`` only opens DCP's file layout, so use
:func:`asymstore.export.dcp_to_torch_save`. ``asymstore export`` (and :func:`asymstore.export.consolidate`)
stitches the chunks of every rank into full tensors under their FQNs (docs/export.md).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from asymstore import dtypes
from asymstore.config import Config
from asymstore.errors import AsymstoreError, ConfigError, CorruptCheckpointError, StepExistsError, StepNotFoundError
from asymstore.lazy import LazyCheckpoint
from asymstore.state import flatten, unflatten
from asymstore.store import Store, TierSpec

__all__ = [
    "AsymStorageReader",
    "AsymStorageWriter",
    "WeightsOnlyLoadPlanner",
    "metadata_from_json",
    "metadata_to_json",
    "parse_checkpoint_id",
]

FORMAT = "asymstore-dcp/1"
_ID_RE = re.compile(r"^(?P<url>.+?)/step_(?P<step>\d+)/?$")

Tiers = str | os.PathLike[str] | Store | Sequence[str | TierSpec]
_Chain = str | os.PathLike[str] | Sequence[str | TierSpec]


def parse_checkpoint_id(checkpoint_id: str | os.PathLike[str]) -> tuple[str, int]:
    """``"<tier url>/step_<N>"`` -> (url, N)."""
    m = _ID_RE.match(os.fspath(checkpoint_id))
    if m is None:
        raise ValueError(f"not an asymstore DCP checkpoint id: {checkpoint_id!r} (expected '<tier url>/step_<N>')")
    return m.group("url"), int(m.group("step"))


# --- Metadata <-> JSON ---------------------------------------------------------------
_MEMORY_FORMATS = {
    torch.contiguous_format: "contiguous_format",
    torch.channels_last: "channels_last",
    torch.channels_last_3d: "channels_last_3d",
    torch.preserve_format: "preserve_format",
}


def _json_value(v: Any, what: str) -> Any:
    """A small JSON-able value (tuples, non-str keys ... via asymstore's tagged skeleton)."""
    flat = flatten(v)
    if flat.tensors:
        raise AsymstoreError(f"DCP {what} holds tensors ({sorted(flat.tensors)[:3]}); it must be plain data")
    return flat.skeleton


def _from_json_value(v: Any) -> Any:
    return unflatten(v, lambda n: (_ for _ in ()).throw(AsymstoreError(f"unexpected tensor {n!r} in metadata")))


def _props_to_json(p: TensorProperties) -> dict[str, Any]:
    return {
        "dtype": dtypes.info(p.dtype).torch_name,
        "layout": str(p.layout).removeprefix("torch."),
        "requires_grad": bool(p.requires_grad),
        "memory_format": _MEMORY_FORMATS[p.memory_format],
        "pin_memory": bool(p.pin_memory),
        "strides": None if p.strides is None else list(p.strides),
    }


def _props_from_json(d: dict[str, Any]) -> TensorProperties:
    return TensorProperties(
        dtype=dtypes.from_name(d["dtype"]),
        layout=getattr(torch, d["layout"]),
        requires_grad=bool(d["requires_grad"]),
        memory_format=getattr(torch, d["memory_format"]),
        pin_memory=bool(d["pin_memory"]),
        strides=None if d.get("strides") is None else tuple(d["strides"]),
    )


def _index_to_json(ix: MetadataIndex) -> list[Any]:
    return [ix.fqn, None if ix.offset is None else list(ix.offset), ix.index]


def _index_from_json(v: list[Any]) -> MetadataIndex:
    fqn, offset, index = v
    return MetadataIndex(fqn, None if offset is None else torch.Size(offset), index)


def metadata_to_json(md: Metadata) -> dict[str, Any]:
    """DCP ``Metadata`` as plain JSON; ``storage_data`` must map MetadataIndex -> {"rank", "name"}."""
    sdm: dict[str, Any] = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            sdm[fqn] = {
                "type": "tensor",
                "size": list(m.size),
                "properties": _props_to_json(m.properties),
                "chunks": [[list(c.offsets), list(c.sizes)] for c in m.chunks],
            }
        elif isinstance(m, BytesStorageMetadata):
            sdm[fqn] = {"type": "bytes"}
        else:
            raise AsymstoreError(f"DCP metadata of {fqn!r} has unknown type {type(m).__name__}")
    storage = [
        [*_index_to_json(ix), int(info["rank"]), str(info["name"])] for ix, info in (md.storage_data or {}).items()
    ]
    sm = md.storage_meta
    return {
        "format": FORMAT,
        "version": md.version,
        "state_dict_metadata": sdm,
        "planner_data": _json_value(md.planner_data, "planner_data"),
        "storage_data": storage,
        "storage_meta": None
        if sm is None
        else {
            "checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id,
            "load_id": sm.load_id,
            "modules": list(sm.modules),
        },
    }


def metadata_from_json(d: dict[str, Any]) -> Metadata:
    """The inverse of :func:`metadata_to_json`; refuses documents of another format."""
    if d.get("format") != FORMAT:
        raise CorruptCheckpointError(f"not a DCP checkpoint written by asymstore (format {d.get('format')!r})")
    sdm: dict[str, Any] = {}
    for fqn, m in d["state_dict_metadata"].items():
        if m["type"] == "tensor":
            sdm[fqn] = TensorStorageMetadata(
                properties=_props_from_json(m["properties"]),
                size=torch.Size(m["size"]),
                chunks=[ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in m["chunks"]],
            )
        else:
            sdm[fqn] = BytesStorageMetadata()
    storage = {_index_from_json(v[:3]): {"rank": int(v[3]), "name": v[4]} for v in d["storage_data"]}
    sm = d.get("storage_meta")
    return Metadata(
        state_dict_metadata=sdm,
        planner_data=_from_json_value(d["planner_data"]),
        storage_data=storage,
        version=d.get("version"),
        storage_meta=None
        if sm is None
        else StorageMeta(
            checkpoint_id=sm["checkpoint_id"], save_id=sm["save_id"], load_id=sm["load_id"], modules=list(sm["modules"])
        ),
    )


def _item_key(item: WriteItem) -> str:
    """The name of a write item inside its rank's part of the step."""
    off = item.index.offset
    if item.type == WriteItemType.BYTE_IO or off is None:
        return item.index.fqn
    return f"{item.index.fqn}@{','.join(str(int(o)) for o in off)}"


def _check_store_options(options: dict[str, Any]) -> dict[str, Any]:
    """Store options checked at construction (not inside ``dcp.save``): known :class:`Config` fields with valid
    values, or ``config=`` (a :class:`Config`). Returns them."""
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(k for k in options if k not in fields and k != "config")
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)}: AsymStorageWriter/AsymStorageReader take the Store options "
            f"({', '.join(sorted(fields - {'rank', 'world_size'}))}) and, for the writer, DCP FileSystemWriter's "
            f"{', '.join(_FS_WRITER_OPTIONS)}"
        )
    base = options.get("config")
    if base is not None and not isinstance(base, Config):
        raise ConfigError(f"config= must be an asymstore Config, got {type(base).__name__}")
    cfg = {k: v for k, v in options.items() if k != "config"}
    (base or Config()).replace(**{**cfg, "rank": 0, "world_size": 1})  # raises ConfigError naming the field
    return options


#: DCP ``FileSystemWriter`` options :class:`AsymStorageWriter` takes (see :func:`_filesystem_writer_options`)
_FS_WRITER_OPTIONS = (
    "single_file_per_rank",
    "sync_files",
    "thread_count",
    "per_thread_copy_ahead",
    "cache_staged_state_dict",
    "overwrite",
    "serialization_format",
    "_extensions",
)


def _filesystem_writer_options(options: dict[str, Any]) -> dict[str, Any]:
    """Map DCP ``FileSystemWriter`` options onto Store options, refusing those asymstore cannot honour.

    * ``single_file_per_rank``, ``thread_count``, ``per_thread_copy_ahead``: accepted (checked) and without
      effect: every rank writes its own directory of partition objects, pipelined on asymstore's threads.
    * ``sync_files``: True (the default) is asymstore's behaviour; False writes local tiers without fsync.
    * ``overwrite``: only False: asymstore never replaces a committed step (delete it first).
    * ``cache_staged_state_dict``, ``_extensions``, ``serialization_format``: only their defaults.
    """
    out = dict(options)
    for k in ("single_file_per_rank", "sync_files", "overwrite", "cache_staged_state_dict"):
        if k in out and not isinstance(out[k], bool):
            raise ConfigError(f"{k} must be True or False, got {out[k]!r}")
    for k, lo in (("thread_count", 1), ("per_thread_copy_ahead", 0)):
        if k in out and (type(out[k]) is not int or out[k] < lo):
            raise ConfigError(f"{k} must be an integer >= {lo}, got {out[k]!r}")
    out.pop("single_file_per_rank", None)
    out.pop("thread_count", None)
    out.pop("per_thread_copy_ahead", None)
    if out.pop("overwrite", False):
        raise ConfigError(
            "overwrite=True is not supported: asymstore never replaces a committed step; delete it first "
            "(Store.delete(step)) or save under another step, and pass overwrite=False (or leave it out)"
        )
    if out.pop("cache_staged_state_dict", False):
        raise ConfigError(
            "cache_staged_state_dict=True is not supported: asymstore stages the state in its own host slots "
            "(see host_slots=); leave it out"
        )
    if out.pop("_extensions", None):
        raise ConfigError("_extensions are not supported: asymstore chooses its own codecs (see compression=)")
    fmt = out.pop("serialization_format", None)
    if fmt is not None and getattr(fmt, "value", fmt) != "torch_save":
        raise ConfigError(
            f"serialization_format={fmt!r} is not supported: asymstore writes its own format; convert a step to "
            "safetensors with `asymstore export URL OUT.safetensors`"
        )
    if out.pop("sync_files", True) is False:
        bo = {k: dict(v) for k, v in out.get("backend_options", {}).items()}
        bo.setdefault("file", {})["fsync"] = False
        out["backend_options"] = bo
    return out


class _StoreOwner:
    """Opens (and owns) Stores for a tier chain, or wraps one given by the user."""

    def __init__(self, tiers: Tiers | None, options: dict[str, Any]) -> None:
        self.given = tiers if isinstance(tiers, Store) else None
        self.tiers: _Chain | None = None if isinstance(tiers, Store) else tiers
        if self.given is not None and options:
            raise ConfigError(
                f"options {', '.join(sorted(options))} cannot apply to an open Store; give them when opening it"
            )
        self.options = _check_store_options(options)
        self._stores: dict[tuple[int, int], Store] = {}

    @property
    def url(self) -> str | None:
        if self.given is not None:
            return next(iter(self.given.tier_urls.values()), None)
        t = self.tiers
        if t is None:
            return None
        first = t if isinstance(t, (str, os.PathLike)) else t[0]
        if isinstance(first, TierSpec):
            return first.url if isinstance(first.url, str) else first.url.url
        return os.fspath(first)

    def set_url(self, url: str) -> None:
        if self.given is not None:
            if self.url is not None and os.path.abspath(self.url) != os.path.abspath(url) and self.url != url:
                raise ValueError(f"checkpoint id names {url!r} but the writer's store is {self.url!r}")
            return
        if self.tiers is None or self.url != url:
            self.close()
            self.tiers = url

    def store(self, rank: int, world_size: int) -> Store:
        if self.given is not None:
            if (self.given.rank, self.given.world_size) != (rank, world_size):
                raise AsymstoreError(
                    f"this DCP rank is rank {rank} of {world_size}, but the given store was opened "
                    f"with rank={self.given.rank}, world_size={self.given.world_size}"
                )
            return self.given
        if self.tiers is None:
            raise ValueError("no asymstore URL: pass one to the writer/reader or a checkpoint_id '<url>/step_<N>'")
        key = (rank, world_size)
        if key not in self._stores:
            chain = [self.tiers] if isinstance(self.tiers, (str, os.PathLike)) else list(self.tiers)
            tiers = [t if isinstance(t, TierSpec) else os.fspath(t) for t in chain]
            self._stores[key] = Store(tiers, **{**self.options, "rank": rank, "world_size": world_size})
        return self._stores[key]

    def close(self) -> None:
        stores, self._stores = list(self._stores.values()), {}
        for s in stores:
            s.close()


class _CheckpointIdMixin:
    """The checkpoint-id handling DCP asks of both the writer and the reader."""

    _owner: _StoreOwner
    _fixed_step: int | None
    step: int | None

    def _use_checkpoint_id(self, checkpoint_id: str | os.PathLike[str] | None) -> None:
        self.step = self._fixed_step
        if checkpoint_id is not None:
            url, step = parse_checkpoint_id(checkpoint_id)
            self._owner.set_url(url)
            self.step = step

    @property
    def checkpoint_id(self) -> str | None:
        url = self._owner.url
        return None if url is None or self.step is None else f"{url}/step_{self.step}"

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _ID_RE.match(os.fspath(checkpoint_id)) is not None


class AsymStorageWriter(_CheckpointIdMixin, StorageWriter):
    """DCP ``StorageWriter`` writing a step of an asymstore tier chain (see the module docstring).

    ``tiers``: a tier URL, a list of tier URLs/``TierSpec``s, or an open :class:`Store` (whose
    rank and world size must match DCP's). ``step``: the step to write (default: from the
    checkpoint id, else the newest committed step + 1). Other keywords are Store options
    (``compression=``, ``host_slots=`` ...) and DCP ``FileSystemWriter``'s own options where they make sense
    (``thread_count``, ``sync_files``, ``single_file_per_rank``, ``overwrite=False`` ...; the others are refused
    here, at construction). Call :meth:`close` when done (it closes the
    stores this writer opened, waiting for promotions down the tier chain).
    """

    def __init__(self, tiers: Tiers | None = None, step: int | None = None, **store_options: Any) -> None:
        super().__init__()
        self._owner = _StoreOwner(tiers, _filesystem_writer_options(store_options))
        self._fixed_step = step
        self.step: int | None = step
        self.is_coordinator = False
        self.save_id = uuid.uuid4().hex
        self._held: tuple[SavePlan, dict[str, Any], int, int] | None = None
        self.last_step: int | None = None

    # -- phase 1 --
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Phase 1: start a new save (``checkpoint_id`` "<url>/step_<N>" names the store and step)."""
        self.save_id = uuid.uuid4().hex
        self._held = None
        self._use_checkpoint_id(checkpoint_id)

    def storage_meta(self) -> StorageMeta | None:
        """What DCP records about this save: the checkpoint id and a save id."""
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    # -- phases 2-4 --
    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Phase 2: remember whether this rank coordinates (rank 0); refuses ``use_collectives=False``."""
        if kwargs.get("use_collectives", True) is False:
            raise AsymstoreError("AsymStorageWriter needs use_collectives=True (rank 0 commits the step)")
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Phase 3: the local plan is used as it is."""
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Phase 4 (coordinator): choose the step, refuse a committed one, tell each rank its index."""
        n = len(plans)
        store = self._owner.store(0, n)
        step = self.step
        if step is None:
            latest = store.latest_step()
            step = 0 if latest is None else latest + 1
        if step in store.steps():
            raise StepExistsError(
                f"step {step} is already committed in {self._owner.url}; delete it first or save under another step"
            )
        return [
            dataclasses.replace(p, storage_data={"rank": i, "world_size": n, "step": step}) for i, p in enumerate(plans)
        ]

    # -- phase 5 --
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Phase 5: ranks > 0 save their items as their rank directory (blocking); rank 0 holds its items."""
        fut: Future[list[WriteResult]] = Future()
        try:
            info = plan.storage_data
            rank, n, step = int(info["rank"]), int(info["world_size"]), int(info["step"])
            if rank == 0 and not self.is_coordinator:
                raise AsymstoreError("the DCP coordinator must be rank 0 of the process group")
            state: dict[str, Any] = {}
            results: list[WriteResult] = []
            keys: list[tuple[WriteItem, str]] = []
            for item in plan.items:
                data = planner.resolve_data(item)
                key = _item_key(item)
                if key in state:
                    raise AsymstoreError(f"two DCP write items map to the key {key!r}")
                if item.type == WriteItemType.BYTE_IO:
                    assert isinstance(data, io.BytesIO)
                    raw = bytes(data.getbuffer())
                    state[key] = (
                        torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                        if raw
                        else torch.empty(0, dtype=torch.uint8)
                    )
                else:
                    assert isinstance(data, torch.Tensor)
                    state[key] = data.detach()
                keys.append((item, key))
            flat = flatten(state)
            for item, key in keys:
                name = flat.skeleton[key if not key.startswith("__") else "__" + key]["__tensor__"]
                t = state[key]
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=t.numel() * t.element_size(),
                        storage_data={"rank": rank, "name": name},
                    )
                )
            if rank == 0:
                self._held = (plan, state, step, n)  # written in finish, with the metadata
            else:
                self._owner.store(rank, n).save(flat, step)  # blocking: durable before DCP's gather
                self.last_step = step
            fut.set_result(results)
        except BaseException as e:
            fut.set_exception(e)  # type: ignore[arg-type]  # torch types it as the result type
        return fut

    # -- phase 6 --
    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Phase 6 (coordinator): save rank 0's items with DCP's metadata as JSON; the step commits once all are durable."""
        if self._held is None:
            raise AsymstoreError("finish() without write_data() on the coordinator")
        _, state, step, n = self._held
        self._held = None
        from torch.distributed.checkpoint import filesystem

        storage: dict[MetadataIndex, Any] = {}
        for rl in results:
            storage.update({wr.index: wr.storage_data for wr in rl})
        md = dataclasses.replace(
            metadata,
            storage_data=storage,
            version=getattr(filesystem, "CURRENT_DCP_VERSION", metadata.version),
            storage_meta=metadata.storage_meta or self.storage_meta(),
        )
        doc = metadata_to_json(md)
        self._owner.store(0, n).save(state, step, user={"dcp": doc})  # commits after all rank directories are durable
        self.last_step = step

    def close(self) -> None:
        """Close the stores this writer opened (waiting for promotions down the tier chain)."""
        self._owner.close()


class AsymStorageReader(_CheckpointIdMixin, StorageReader):
    """DCP ``StorageReader`` reading a step of an asymstore tier chain, on any world size.

    ``step``: default from the checkpoint id, else the newest committed step. Reads come from
    the fastest tier that holds the step, verified; a damaged copy is read from the next tier.
    """

    def __init__(self, tiers: Tiers | None = None, step: int | None = None, **store_options: Any) -> None:
        super().__init__()
        self._owner = _StoreOwner(tiers, store_options)
        self._fixed_step = step
        self.step: int | None = step
        self.load_id = uuid.uuid4().hex
        self.storage_data: dict[MetadataIndex, dict[str, Any]] = {}
        self._parts: dict[int, LazyCheckpoint] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load (``checkpoint_id`` "<url>/step_<N>" names the store and step)."""
        self.load_id = uuid.uuid4().hex
        self.storage_data = {}
        self._parts = {}
        self._use_checkpoint_id(checkpoint_id)

    def _store(self) -> Store:
        if self._owner.given is not None:
            return self._owner.given
        return self._owner.store(0, 1)

    def _step(self) -> int:
        if self.step is None:
            latest = self._store().latest_step()
            if latest is None:
                raise StepNotFoundError(f"no committed checkpoint in {self._owner.url}")
            self.step = latest
        return self.step

    def _open_rank(self, rank: int) -> LazyCheckpoint:
        """Rank ``rank``'s part of the step, read in the catalog's order (fastest tier first); a range that is
        damaged on one tier is read from the next (:meth:`Store.open_checkpoint`)."""
        step = self._step()
        try:
            return self._store().open_checkpoint(step, rank=rank)
        except StepNotFoundError as e:
            raise StepNotFoundError(f"step {step} is not committed in {self._owner.url}: {e}") from e

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP's ``Metadata`` of the step, from the manifest of rank 0's part."""
        ck = self._open_rank(0)
        doc = ck.user.get("dcp")
        if doc is None:
            raise CorruptCheckpointError(
                f"step {ck.step} of {self._owner.url} was not written through DCP "
                "(no 'dcp' metadata in rank 0's manifest)"
            )
        try:
            md = metadata_from_json(doc)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
            raise CorruptCheckpointError(
                f"step {ck.step} of {self._owner.url}: the DCP metadata in rank 0's manifest is malformed "
                f"({type(e).__name__}: {str(e)[:200]})"
            ) from None
        if md.storage_meta is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Remember where each item lives (``storage_data`` of the metadata)."""
        self.storage_data = metadata.storage_data
        if self.storage_data is None:
            raise CorruptCheckpointError("DCP metadata without storage_data")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """The local plan is used as it is."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """The global plan is used as it is."""
        return plans

    def _read(self, req: ReadItem) -> torch.Tensor:
        info = self.storage_data[req.storage_index]
        rank, name = int(info["rank"]), info["name"]
        if rank not in self._parts:
            self._parts[rank] = self._open_rank(rank)
        lt = self._parts[rank][name]
        if req.type == LoadItemType.BYTE_IO or not lt.shape:
            return lt.read()
        o0, l0 = int(req.storage_offsets[0]), int(req.lengths[0])
        return lt[o0 : o0 + l0]  # reads only the chunks holding these rows

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item of ``plan`` (only the chunks holding its rows) into the planner's tensors."""
        fut: Future[None] = Future()
        try:
            for req in plan.items:
                t = self._read(req)
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, io.BytesIO(t.numpy().tobytes()))
                    continue
                if t.dim():
                    rest = [0, *[int(o) for o in req.storage_offsets[1:]]]
                    t = narrow_tensor_by_index(t, torch.Size(rest), req.lengths)
                target = planner.resolve_tensor(req).detach()
                if target.size() != t.size():
                    raise CorruptCheckpointError(
                        f"{req.storage_index}: stored chunk {tuple(t.size())} does not "
                        f"match the requested {tuple(target.size())}"
                    )
                target.copy_(t)
                planner.commit_tensor(req, target)
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)  # type: ignore[arg-type]  # torch types it as the result type
        return fut

    def close(self) -> None:
        """Close the stores this reader opened."""
        self._owner.close()


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads DCP's bytes items with ``torch.load(weights_only=True)``.

    DCP pickles non-tensor values; its default planner unpickles them with
    ``weights_only=False`` (arbitrary code). This one accepts only what torch's restricted
    unpickler allows (tensors, primitive containers, numbers, strings).
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Unpickle a bytes item with ``torch.load(weights_only=True)`` and place it in the state dict."""
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
