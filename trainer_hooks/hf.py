"""Hugging Face ``transformers.Trainer`` checkpointing through asymstore.

:class:`AsymstoreCallback` attaches an :class:`~asymstore.trainer_hooks.AsymCheckpointer` to
the Trainer's model, optimizer and LR scheduler once they exist (``on_train_begin``), so the
snapshot of step t is copied during forward/backward of step t+1 (asymmetric hooks, with the
optimizer's step pre-hook as the barrier), then persisted in the background::

    store = asymstore.open_store("/nvme/ckpt")
    cb = AsymstoreCallback(store, every=100)                       # checkpoint every 100 steps
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[cb])   # args.save_strategy="no"
    trainer.train()
    # after a restart: a fresh Trainer with AsymstoreCallback(store, resume=True)
    trainer.train()                                                # restores, then continues

State mapping (one asymstore step per checkpoint, step = ``TrainerState.global_step``):
``model`` (``model.state_dict()``), ``optimizers`` (the wrapped torch optimizer's state),
``scheduler``, ``rng`` (python/numpy/torch), ``step``, and ``extras.trainer_state``: the
``TrainerState`` as its own JSON text (``dataclasses.asdict``, as HF writes
``trainer_state.json``). No pickle anywhere.

Resume (``resume=True`` for the newest step, or a step number) happens in ``on_train_begin``,
after the Trainer created its optimizer and scheduler: model, optimizer, scheduler and RNG
states are restored in place, and ``global_step``, ``epoch``, ``log_history``, ``total_flos``,
``num_input_tokens_seen`` and the best-metric fields of ``TrainerState``; the Trainer then
runs until ``max_steps`` counting from the restored step. Data position: HF fast-forwards its
data loader only for its own ``resume_from_checkpoint`` directories, decided before any
callback runs; after an asymstore resume the loader starts at the beginning of the data
(like ``ignore_data_skip=True``). Use a map-style dataset with a sampler keyed on the step if
the exact sample order matters.

Steps are counted by the torch optimizer's step hooks. With gradient accumulation that is one
per update, like ``global_step``; an update that a ``GradScaler`` skips (fp16 overflow) does not
call the inner optimizer and is not counted, so ``every`` then drifts from ``global_step``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from asymstore.store import Store

from .torch_hooks import AsymCheckpointer, Strategy

log = logging.getLogger("asymstore.hf")

__all__ = ["AsymstoreCallback"]

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


def _unwrap(obj: Any, attr: str, kind: type) -> Any:
    """accelerate wraps optimizers (``.optimizer``) and schedulers (``.scheduler``): use the inner one."""
    while obj is not None and isinstance(getattr(obj, attr, None), kind):
        obj = getattr(obj, attr)
    return obj


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

    # --- the TrainerState as JSON ----------------------------------------------------
    def _extras(self) -> dict[str, Any]:
        st = self._state
        return {"trainer_state": json.dumps(dataclasses.asdict(st), sort_keys=True) if st is not None else None}

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
        if self.resume is not False:
            self._restore(state, None if self.resume is True else int(self.resume))
        self.checkpointer.attach()

    def _restore(self, state: TrainerState, step: int | None) -> None:
        ck = self.checkpointer
        assert ck is not None
        if step is None and not self.store.steps():
            log.warning("AsymstoreCallback(resume=True): no checkpoint in the store; starting from scratch")
            return
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
