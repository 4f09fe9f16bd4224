"""asymstore: tiered, asymmetric, never-lossy checkpointing for large-model training.

Quick use::

    import asymstore
    store = asymstore.open_store("/tmp/ckpt")          # host memory + a local directory
    store.save({"model": model.state_dict(), "step": 10}, step=10)
    state = store.restore()                            # newest complete checkpoint
    ck = asymstore.open_checkpoint("/tmp/ckpt")        # lazy: ck["model/wte.weight"][:8]
"""

from .config import Config
from .errors import (
    AsymstoreError,
    BackendUnavailableError,
    CheckpointFailedError,
    ConfigError,
    CorruptCheckpointError,
    SnapshotSlotsBusyError,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    UnsupportedValueError,
)
from .lazy import LazyCheckpoint, LazyTensor, open_checkpoint
from .retention import ByteBudget, EveryN, KeepAll, LatestN
from .store import RestoreReport, SaveHandle, SaveResult, Store, TierSpec, open_store

__version__ = "0.1.0"

__all__ = [
    "AsymstoreError",
    "BackendUnavailableError",
    "ByteBudget",
    "CheckpointFailedError",
    "Config",
    "ConfigError",
    "CorruptCheckpointError",
    "EveryN",
    "KeepAll",
    "LatestN",
    "LazyCheckpoint",
    "LazyTensor",
    "RestoreReport",
    "SaveHandle",
    "SaveResult",
    "SnapshotSlotsBusyError",
    "StateMismatchError",
    "StepExistsError",
    "StepNotFoundError",
    "Store",
    "TierSpec",
    "UnsupportedValueError",
    "open_checkpoint",
    "open_store",
]
