"""The ExCP variant of the comparison: asymstore's ``asym`` snapshots persisted losslessly to a first tier and
promoted to an archive tier with the ExCP lossy codec (``TierSpec(..., lossy="excp")``, asymstore/excp.py:
residuals against the previous checkpoint, pruning and quantisation of weights and Adam moments).

Bytes stored are the archive's; a restore reads the archive (a fresh store whose first tier does not hold the
step), and the measured reconstruction error is checked against the bounds the manifest records.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import torch

from asymstore.store import Store, TierSpec
from benchmarks._variants import AsymV, Info, load_into


def why_not() -> str | None:
    """Why the ExCP codec cannot run here (``None``: it can)."""
    try:
        import asymstore.excp  # noqa: F401
    except ImportError as e:
        return f"asymstore has no ExCP codec ({e})"
    return None


#: how long a drain waits for the archive's promotions (they run in the background)
FLUSH_S = 120.0
#: how long a promotion may keep failing before the variant fails
ERROR_S = 5.0


class ExcpV(AsymV):
    """asym snapshots; first tier lossless, archive tier ExCP (lossy)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, root: str, keep: int, warmup: int) -> None:
        super().__init__(
            "excp",
            "asym",
            Info("ExCP", "asymstore archive tier with the ExCP lossy codec", lossless=False),
            model,
            opt,
            root,
            keep,
            warmup=warmup,
        )
        # the base class made a one-tier store: replace it with first tier + ExCP archive
        self.ck.store.close()
        self.archive = os.path.join(root, "excp_archive")
        self.store = Store(
            [TierSpec(self.dir, keep=max(keep, 1)), TierSpec(self.archive, keep=max(keep, 2), lossy="excp")],
            close_timeout_s=10.0,  # a failing archive must not hold the benchmark for minutes
        )
        self.ck.store = self.store
        self.last_errors: dict[str, Any] = {}

    def drain(self) -> None:
        super().drain()
        self._flush()

    def _flush(self) -> None:
        """Wait for the archive's promotions; a promotion that keeps failing (retried in the background) fails
        the variant after ``ERROR_S`` instead of waiting ``FLUSH_S``."""
        t0 = time.perf_counter()
        first_error: float | None = None
        while not self.store.flush(0.5):
            now = time.perf_counter()
            if self._tier_error():
                first_error = first_error if first_error is not None else now
                if now - first_error > ERROR_S:
                    raise RuntimeError(f"ExCP archive promotion failing: {self._tier_error()}")
            if now - t0 > FLUSH_S:
                raise RuntimeError(f"ExCP archive promotions did not finish within {FLUSH_S} s: {self._tier_error()}")

    def after_block(self) -> None:
        super().after_block()
        self._flush()  # the block's last checkpoint reaches the archive before a restore reads it

    def _tier_error(self) -> str:
        if self.store.manager is None:
            return ""
        return "; ".join(f"{t['name']}: {t['last_error']}" for t in self.store.manager.status() if t["last_error"])

    def _archive_steps(self) -> list[int]:
        return sorted(self.store.tiers[-1].committed_steps())

    def stored_bytes(self) -> int:
        steps = self._archive_steps()
        if not steps:
            return 0
        return int(self.store.tiers[-1].reader(steps[-1]).manifest.stored_bytes)

    def archive_manifest(self) -> Any:
        steps = self._archive_steps()
        return self.store.tiers[-1].reader(steps[-1]).manifest if steps else None

    def restore_into(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
        """The newest archived step, read from the archive (a fresh store with an empty first tier)."""
        empty = tempfile.mkdtemp(prefix="asym-excp-empty-")
        st = Store([empty, TierSpec(self.archive, lossy="excp")], host_memory="private")
        try:
            out = st.restore()
            load_into(model, opt, out["model"], out["optimizers"][0])
            rep = st.last_restore
            self.last_errors = dict(rep.detail or {}) if rep is not None and isinstance(rep.detail, dict) else {}
            return f"{rep.tier if rep is not None else '?'} (lossy={getattr(rep, 'lossy', None)})"
        finally:
            st.close()
            shutil.rmtree(empty, ignore_errors=True)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.archive, ignore_errors=True)


def make(model: torch.nn.Module, opt: torch.optim.Optimizer, root: str, keep: int, warmup: int) -> ExcpV:
    return ExcpV(model, opt, root, keep, warmup)
