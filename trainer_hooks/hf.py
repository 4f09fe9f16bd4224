"""Hugging Face ``transformers.Trainer`` checkpointing through asymstore.

:class:`AsymstoreCallback` attaches an :class:`~asymstore.trainer_hooks.AsymCheckpointer` to
the Trainer's model, optimizer and LR scheduler once they exist (``on_train_begin``), so the
snapshot of step t is copied during forward/backward of step t+1 (asymmetric hooks, with the
optimizer's step pre-hook as the barrier), then persisted in the background::

    store = asymstore.open_store("/nvme/ckpt")
    cb = AsymstoreCallback(store, every=100, resume=True)   # checkpoint every 100 steps; resume if any
    trainer = AsymstoreTrainer(model, args, train_dataset=ds, callbacks=[cb])   # args.save_strategy="no"
    trainer.train()       # first run: trains from scratch; after a restart: resumes exactly, then continues
    # a Trainer subclass of your own (e.g. trl's SFTTrainer): exact_resume(trainer).train()

State mapping (one asymstore step per checkpoint, step = ``TrainerState.global_step``):
``model`` (``model.state_dict()``), ``optimizers`` (the wrapped torch optimizer's state),
``scheduler``, ``rng`` (python/numpy/torch), ``step``, and ``extras.trainer_state``: the
``TrainerState`` as its own JSON text (``dataclasses.asdict``, as HF writes
``trainer_state.json``). No pickle anywhere.

Resume (``resume=True`` for the newest step, or a step number) comes in two forms:

* **Exact** (:class:`AsymstoreTrainer`, or any Trainer passed through :func:`exact_resume`): ``train()``
  hands the asymstore step to the Trainer's own ``resume_from_checkpoint`` machinery, so everything HF's
  resume restores is restored, at the points where HF restores it: the model weights before the model is
  prepared, the optimizer and scheduler after they are created, the ``TrainerState`` (``global_step``,
  ``epoch``, ``log_history``, ``total_flos``, ``num_input_tokens_seen``, best-metric fields, stateful
  callbacks), and the data position: HF skips the epochs already trained and the batches of the current
  epoch (``skip_first_batches``, so a seeded shuffling sampler yields the same order), then sets the
  python/numpy/torch(/CUDA) RNG states of the checkpoint right before the first batch trained after the
  resume. The losses after the resume equal those of an uninterrupted run (``==`` on the floats, on one
  machine with deterministic kernels). Only a small ``trainer_state.json`` is written, into a temporary
  directory removed when ``train()`` returns; no weights go through files.
* **In place** (a plain ``Trainer``): in ``on_train_begin``, after the Trainer created its optimizer and
  scheduler, model, optimizer, scheduler and RNG states and the ``TrainerState`` fields above are restored in
  place and the Trainer runs until ``max_steps`` counting from the restored step. HF decided the data
  position before any callback runs, so the loader starts at the beginning of the data (like
  ``ignore_data_skip=True``); a warning says so.

Not restored in either form: a ``GradScaler``'s scale (fp16 mixed precision on GPUs starts from the initial
scale again), and the ``log_history`` entry of the checkpoint's own step (the snapshot is taken right after
the optimizer step, before the Trainer logs it). DeepSpeed engines inside the Trainer are refused by the exact
resume (use :class:`~asymstore.trainer_hooks.DeepSpeedAsymCheckpointer`).

Steps are counted by the torch optimizer's step hooks. With gradient accumulation that is one
per update, like ``global_step``; an update that a ``GradScaler`` skips (fp16 overflow) does not
call the inner optimizer and is not counted, so ``every`` then drifts from ``global_step``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from asymstore.errors import ConfigError
from asymstore.store import Store

from .torch_hooks import AsymCheckpointer, Strategy, set_rng_state

log = logging.getLogger("asymstore.hf")

__all__ = ["AsymstoreCallback", "AsymstoreResumeMixin", "AsymstoreTrainer", "exact_resume"]

_RESTORED_FIELDS = (
    "global_step",
    "epoch",
    "log_history",
    "total_flos",
    "num_input_tokens_seen",
    "best_metric",
    "best_global_step",
    "best_model_checkpoint",
    "trial_name",
    "trial_params",
)
#: the file HF's resume reads the TrainerState from (transformers' TRAINER_STATE_NAME)
_TRAINER_STATE_NAME = "trainer_state.json"


def _unwrap(obj: Any, attr: str, kind: type) -> Any:
    """accelerate wraps optimizers (``.optimizer``) and schedulers (``.scheduler``): use the inner one."""
    while obj is not None and isinstance(getattr(obj, attr, None), kind):
        obj = getattr(obj, attr)
    return obj


@dataclass
class _Resume:
    """A step restored into host memory for the Trainer's own resume path, and the directory HF reads."""

    step: int
    state: dict[str, Any]
    directory: str


class AsymstoreCallback(TrainerCallback):
    """Checkpoint a ``transformers.Trainer`` run into an asymstore :class:`Store` (see the module doc).

    ``every``: checkpoint every N optimizer steps (default: ``args.save_steps`` when
    ``save_strategy="steps"``). ``resume``: ``True`` (newest step), a step, or ``False``.
    ``strategy``/``warmup``: as for :class:`AsymCheckpointer`. ``wait_at_end``: wait for the
    last checkpoint's persistence in ``on_train_end`` (re-raising a background failure).
    """

    def __init__(
        self,
        store: Store,
        *,
        every: int | None = None,
        resume: bool | int = False,
        strategy: Strategy = "asym",
        warmup: int = 2,
        wait_at_end: bool = True,
    ) -> None:
        self.store = store
        self.every = every
        self.resume = resume
        self.strategy: Strategy = strategy
        self.warmup = warmup
        self.wait_at_end = wait_at_end
        self.checkpointer: AsymCheckpointer | None = None
        self.restored_step: int | None = None
        self._state: TrainerState | None = None
        self._exact: _Resume | None = None  # set by AsymstoreResumeMixin.train while it resumes

    # --- the TrainerState as JSON ----------------------------------------------------
    def _extras(self) -> dict[str, Any]:
        st = self._state
        if st is None:
            return {"trainer_state": None}
        d = dataclasses.asdict(st)
        if self.checkpointer is not None:
            # taken in the optimizer's post-step hook: the Trainer counts the step right after it
            d["global_step"] = self.checkpointer.step
        return {"trainer_state": json.dumps(d, sort_keys=True)}

    def _load_for_exact_resume(self) -> _Resume | None:
        """Restore the step to resume from into host memory and write the ``trainer_state.json`` HF's resume
        reads; ``None`` when ``resume`` is off or the store holds no checkpoint (``resume=True``)."""
        if self.resume is False:
            return None
        step = self._resume_step(None if self.resume is True else int(self.resume))
        if step is None:
            return None
        self.store.discard_uncommitted()  # a crashed attempt's partial shards go before anything is saved again
        restored = self.store.restore(step)
        if not isinstance(restored, dict) or not {"model", "optimizers", "rng", "step"} <= set(restored):
            raise ConfigError(
                f"step {step} of {self.store.tiers[0].url} is not an "
                "AsymstoreCallback checkpoint (no model, optimizers, rng and step)"
            )
        saved_step = int(restored["step"])
        text = (restored.get("extras") or {}).get("trainer_state")
        ts = json.loads(text) if text else {}
        ts["global_step"] = saved_step  # checkpoints written before the extras carried it hold the step before
        directory = tempfile.mkdtemp(prefix="asymstore-resume-")
        with open(os.path.join(directory, _TRAINER_STATE_NAME), "w") as f:
            json.dump(ts, f)
        self._exact = _Resume(saved_step, restored, directory)
        return self._exact

    def _every(self, args: TrainingArguments) -> int:
        if self.every is not None:
            return int(self.every)
        strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        if strategy == "steps" and args.save_steps and float(args.save_steps) >= 1:
            return int(args.save_steps)
        raise ValueError("AsymstoreCallback needs every=N (or save_strategy='steps' with an integer save_steps)")

    # --- events ----------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        """Attach the checkpointer to the Trainer's model, optimizer and scheduler; resume first if asked."""
        if model is None or optimizer is None:
            raise RuntimeError("AsymstoreCallback needs the Trainer's model and optimizer in on_train_begin")
        opt = _unwrap(optimizer, "optimizer", torch.optim.Optimizer)
        sched = _unwrap(lr_scheduler, "scheduler", torch.optim.lr_scheduler.LRScheduler)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"cannot find the torch optimizer inside {type(optimizer).__name__}")
        self._state = state
        self.checkpointer = AsymCheckpointer(
            model,
            opt,
            self.store,
            every=self._every(args),
            scheduler=sched,
            strategy=self.strategy,
            warmup=self.warmup,
            extras=self._extras,
            start_step=state.global_step,
        )
        if self._exact is not None:  # the Trainer restored everything through its own resume path
            self.restored_step = self._exact.step
            self.checkpointer.step = state.global_step
            log.info("resumed from asymstore step %s (%s)", self._exact.step, self.store.last_restore)
        elif self.resume is not False:
            self._restore(state, None if self.resume is True else int(self.resume))
        self.checkpointer.attach()

    def _resume_step(self, step: int | None) -> int | None:
        """The step to resume from: ``step``, else the newest every rank can restore (a collective in a job of
        several ranks, so that they all resume from the same step or all start from scratch); ``None``: none."""
        if step is not None:
            return step
        agreed = self.store.agreed_latest_step()
        if agreed is None:
            log.warning("AsymstoreCallback(resume=True): no checkpoint in the store; starting from scratch")
        return agreed

    def _restore(self, state: TrainerState, step: int | None) -> None:
        ck = self.checkpointer
        assert ck is not None
        step = self._resume_step(step)
        if step is None:
            return
        log.warning(
            "AsymstoreCallback resumes in place: the data loader starts from the beginning of the data; "
            "use AsymstoreTrainer or exact_resume(trainer) to continue the data order as HF's resume does"
        )
        extras = ck.resume(step)  # model, optimizer, scheduler, RNG, step (in place)
        self.restored_step = ck.step
        text = extras.get("trainer_state")
        if text:
            saved = json.loads(text)
            for f in _RESTORED_FIELDS:
                if f in saved:
                    setattr(state, f, saved[f])
        state.global_step = ck.step  # the snapshot was taken right after this optimizer step
        log.info("resumed from asymstore step %s (%s)", ck.step, self.store.last_restore)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Detach the hooks (waiting for the last checkpoint's persistence with ``wait_at_end``)."""
        if self.checkpointer is not None:
            self.checkpointer.detach(finish=self.wait_at_end)


# --- the exact resume: HF's own resume_from_checkpoint path, fed from asymstore --------------------------
def _callback_of(trainer: Any) -> AsymstoreCallback | None:
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AsymstoreCallback)]
    if len(found) > 1:
        raise ConfigError("a Trainer takes at most one AsymstoreCallback")
    return found[0] if found else None


class AsymstoreResumeMixin:
    """``Trainer`` methods that resume from the step of its :class:`AsymstoreCallback` (``resume=True`` or a
    step) through HF's own ``resume_from_checkpoint`` path (see the module doc). Put it before the Trainer
    class: ``class MyTrainer(AsymstoreResumeMixin, SFTTrainer)``, or use :func:`exact_resume`."""

    _asymstore_resume: _Resume | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; without ``resume_from_checkpoint``, resume from the callback's asymstore step."""
        base: Any = super()
        cb = _callback_of(self)
        if cb is None or cb.resume is False or resume_from_checkpoint not in (None, False):
            return base.train(resume_from_checkpoint, *args, **kwargs)
        if getattr(self, "is_deepspeed_enabled", False):
            raise ConfigError(
                "the exact asymstore resume does not drive DeepSpeed engines inside the Trainer; "
                "checkpoint them with DeepSpeedAsymCheckpointer"
            )
        res = cb._load_for_exact_resume()
        if res is None:
            return base.train(None, *args, **kwargs)
        self._asymstore_resume = res
        try:
            return base.train(res.directory, *args, **kwargs)
        finally:
            self._asymstore_resume = None
            cb._exact = None
            try:
                os.remove(os.path.join(res.directory, _TRAINER_STATE_NAME))
                os.rmdir(res.directory)
            except OSError:
                pass

    def _ours(self, checkpoint: str | None) -> _Resume | None:
        r = self._asymstore_resume
        return r if r is not None and checkpoint == r.directory else None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        r = self._ours(resume_from_checkpoint)
        if r is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        target = model if model is not None else self.model  # type: ignore[attr-defined]
        target.load_state_dict(r.state["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        r = self._ours(checkpoint)
        if r is None:
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
            return
        opt = _unwrap(self.optimizer, "optimizer", torch.optim.Optimizer)  # type: ignore[attr-defined]
        saved = r.state["optimizers"]
        if not isinstance(opt, torch.optim.Optimizer) or len(saved) != 1:
            raise ConfigError(f"step {r.step} holds {len(saved)} optimizer states; this Trainer has one optimizer")
        opt.load_state_dict(saved[0])
        sched = _unwrap(self.lr_scheduler, "scheduler", torch.optim.lr_scheduler.LRScheduler)  # type: ignore[attr-defined]
        if "scheduler" in r.state and sched is not None:
            with warnings.catch_warnings():  # torch's note on a state loaded before the first step
                warnings.simplefilter("ignore")
                sched.load_state_dict(r.state["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        if self._ours(checkpoint) is None:
            super()._load_scaler(checkpoint)  # type: ignore[misc]
        # an asymstore step holds no GradScaler state: the scaler starts from its initial scale

    def _load_rng_state(self, checkpoint: str | None) -> None:
        r = self._ours(checkpoint)
        if r is None:
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
            return
        if "rng" not in r.state:
            log.warning("the RNG states of asymstore step %s were already restored", r.step)
            return
        set_rng_state(r.state["rng"])
        r.state.clear()  # the last part HF restores: the restored tensors (views of one buffer) are freed


class AsymstoreTrainer(AsymstoreResumeMixin, Trainer):
    """``transformers.Trainer`` whose ``train()`` resumes exactly from its :class:`AsymstoreCallback`'s step."""


_T = TypeVar("_T")


def exact_resume(trainer: _T) -> _T:
    """Give ``trainer`` (any ``Trainer`` subclass instance) the exact asymstore resume of
    :class:`AsymstoreTrainer`, by switching its class to a subclass with :class:`AsymstoreResumeMixin`
    first; returns it. ``exact_resume(trainer).train()`` then resumes as ``AsymstoreTrainer`` does."""
    if not isinstance(trainer, Trainer):
        raise TypeError(f"exact_resume takes a transformers.Trainer, got {type(trainer).__name__}")
    cls = type(trainer)
    if not issubclass(cls, AsymstoreResumeMixin):
        trainer.__class__ = type(f"Asymstore{cls.__name__}", (AsymstoreResumeMixin, cls), {})
    return trainer
