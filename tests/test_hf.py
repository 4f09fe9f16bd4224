"""Hugging Face Trainer + AsymstoreCallback: checkpoint, restore into a fresh Trainer, continue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_bitequal

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install asymstore[hf])")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import asymstore  # noqa: E402
from asymstore.trainer_hooks.hf import (  # noqa: E402
    AsymstoreCallback,
    AsymstoreResumeMixin,
    AsymstoreTrainer,
    exact_resume,
)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seq: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(cfg)


def _args(tmp_path, max_steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


class Probe(TrainerCallback):
    """Records the model and optimizer state when the first step of a run begins (after the restore)."""

    def __init__(self) -> None:
        self.first: dict | None = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        if self.first is None:
            inner = getattr(optimizer, "optimizer", optimizer)
            self.first = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "exp_avg": [inner.state[p]["exp_avg"].clone() for p in model.parameters() if p in inner.state],
                "lr": inner.param_groups[0]["lr"],
                "global_step": state.global_step,
            }


@pytest.mark.parametrize("strategy", ["asym", "sync"])
def test_trainer_checkpoint_resume_continue(tmp_path, strategy):
    store = asymstore.open_store(str(tmp_path / "ck"))
    cb = AsymstoreCallback(store, every=2, strategy=strategy)
    trainer = Trainer(model=_model(1), args=_args(tmp_path, 4), train_dataset=Tokens(), callbacks=[cb])
    trainer.train()
    assert store.steps() == [2, 4]
    final_model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    final_moments = [opt.state[p]["exp_avg"].clone() for p in trainer.model.parameters()]
    final_lr = opt.param_groups[0]["lr"]

    saved = store.restore(4)  # the checkpoint of step 4 is the state right after optimizer step 4
    assert_bitequal({k: saved["model"][k] for k in final_model}, final_model)
    assert saved["step"] == 4 and '"global_step"' in saved["extras"]["trainer_state"]

    # a fresh process: another initialisation, a new Trainer; resume and continue to step 6
    store2 = asymstore.open_store(str(tmp_path / "ck"))
    cb2 = AsymstoreCallback(store2, every=2, strategy=strategy, resume=True)
    probe = Probe()
    trainer2 = Trainer(model=_model(2), args=_args(tmp_path, 6), train_dataset=Tokens(), callbacks=[cb2, probe])
    out = trainer2.train()
    assert cb2.restored_step == 4
    assert probe.first is not None and probe.first["global_step"] == 4
    assert_bitequal(probe.first["model"], final_model)  # restored weights bit-identical
    assert_bitequal(probe.first["exp_avg"], final_moments)
    assert probe.first["lr"] == final_lr  # scheduler position restored with the optimizer
    assert out.global_step == 6 and trainer2.state.global_step == 6
    assert store2.steps() == [2, 4, 6]
    assert [h["step"] for h in trainer2.state.log_history if "loss" in h][:2] == [1, 2]  # history carried over
    after = store2.restore(6)
    assert_bitequal({k: after["model"][k] for k in final_model}, {k: v for k, v in trainer2.model.state_dict().items()})
    store.close()
    store2.close()


# --- exact resume after SIGKILL (AsymstoreTrainer: HF's own resume path) --------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _worker(tmp_path: Path, name: str, ckdir: Path, max_steps: int, every: int, grad_acc: int, kill_at=None):
    out = tmp_path / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "tests._hf_worker", str(ckdir), str(out), str(max_steps), str(every), str(grad_acc)]
    if kill_at is not None:
        cmd.append(str(kill_at))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    return out, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.mark.slow
@pytest.mark.parametrize(
    "every, kill_at, grad_acc",
    [
        pytest.param(4, 10, 2, id="mid-epoch"),  # resume from 8: epoch 1, 2 of its 6 updates done (4 batches)
    ],
)
def test_sigkill_then_exact_resume_gives_identical_losses(tmp_path, every, kill_at, grad_acc):
    max_steps = 16
    base_out, base = _worker(tmp_path, "uninterrupted", tmp_path / "ck-base", max_steps, every, grad_acc)
    killed_out, killed = _worker(tmp_path, "killed", tmp_path / "ck", max_steps, every, grad_acc, kill_at)
    rc, out, err = _wait(killed)
    assert rc == -signal.SIGKILL, (rc, out, err[-3000:])
    assert f"killing at step {kill_at}" in out
    resume_from = (kill_at - 1) // every * every
    assert f"durable {resume_from}" in out
    resumed_out, resumed = _worker(tmp_path, "resumed", tmp_path / "ck", max_steps, every, grad_acc)
    rc, out, err = _wait(resumed)
    assert rc == 0, err[-3000:]
    assert f"resumed from {resume_from}" in out, out
    rc, out, err = _wait(base)
    assert rc == 0 and "resumed from None" in out, err[-3000:]

    want = _records(base_out)
    assert len(want) == max_steps * grad_acc
    got = _records(resumed_out)
    assert [r["step"] for r in got] == [r["step"] for r in want if r["step"] > resume_from]
    # the data order continues (a shuffling sampler: epoch 0 is not the dataset's order) ...
    order = [i for r in want[: 48 // 4] for i in r["first_tokens"]]
    assert sorted(order) == list(range(48)) and order != list(range(48))
    assert [r["first_tokens"] for r in got] == [r["first_tokens"] for r in want if r["step"] > resume_from]
    # ... and every loss after the resume equals the uninterrupted run's, exactly
    assert [r["loss"] for r in got] == [r["loss"] for r in want if r["step"] > resume_from]
    # the killed run had trained past the checkpoint it resumed from (its losses there agree too)
    lost = [r for r in _records(killed_out) if r["step"] > resume_from]
    assert lost and [r["loss"] for r in lost] == [r["loss"] for r in want[: len(_records(killed_out))][-len(lost) :]]


class LossLog(TrainerCallback):
    """Per optimizer step: the logged loss (the mean over the step's micro-batches)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _resume_args(tmp_path, max_steps: int, grad_acc: int) -> TrainingArguments:
    a = _args(tmp_path, max_steps)
    a.gradient_accumulation_steps = grad_acc
    return a


def _dropout_model(seed: int = 1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1)
    return GPT2LMHeadModel(cfg)


@pytest.fixture
def one_thread():
    """Deterministic CPU kernels, and no oversubscribed cores on a small machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("exact", [True, False], ids=["AsymstoreTrainer", "plain-Trainer"])
def test_resume_continues_the_data_order(tmp_path, exact, one_thread):
    """In one process: an uninterrupted run of 12 steps; a run stopped after step 8 (checkpoints 4 and 8), then
    a fresh Trainer resuming from step 8. With AsymstoreTrainer the losses of steps 9-12 equal the uninterrupted
    run's (the shuffled data order and the dropout RNG continue); a plain Trainer resumes in place, restarting
    the data loader, so they differ."""
    steps, grad_acc = 12, 2  # 64 samples, 4 per batch, 2 per update: 8 updates per epoch; 8 ends epoch 0
    full = LossLog()
    with asymstore.open_store(str(tmp_path / "full")) as store:
        AsymstoreTrainer(
            model=_dropout_model(),
            args=_resume_args(tmp_path, steps, grad_acc),
            train_dataset=Tokens(),
            callbacks=[AsymstoreCallback(store, every=4), full],
        ).train()
    assert sorted(full.losses) == list(range(1, steps + 1))
    with asymstore.open_store(str(tmp_path / "ck")) as store:
        first = LossLog()
        AsymstoreTrainer(
            model=_dropout_model(),
            args=_resume_args(tmp_path, steps, grad_acc),
            train_dataset=Tokens(),
            callbacks=[AsymstoreCallback(store, every=4), first, StopAt(6)],
        ).train()
        assert store.steps() == [4]
        assert first.losses == {s: full.losses[s] for s in range(1, 7)}
    with asymstore.open_store(str(tmp_path / "ck")) as store:
        cb = AsymstoreCallback(store, every=4, resume=True)
        log = LossLog()
        cls = AsymstoreTrainer if exact else Trainer
        trainer = cls(
            model=_dropout_model(7),  # another initialisation: everything comes from the checkpoint
            args=_resume_args(tmp_path, steps, grad_acc),
            train_dataset=Tokens(),
            callbacks=[cb, log],
        )
        trainer.train()
        assert cb.restored_step == 4 and trainer.state.global_step == steps
        assert sorted(log.losses) == list(range(5, steps + 1))
        after = {s: full.losses[s] for s in range(5, steps + 1)}
        if exact:
            assert log.losses == after  # == on the floats
            assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, *range(5, steps + 1)]
        else:
            assert log.losses != after


def test_exact_resume_of_a_trainer_subclass(tmp_path, one_thread):
    class MyTrainer(Trainer):
        pass

    with asymstore.open_store(str(tmp_path / "ck")) as store:
        AsymstoreTrainer(
            model=_model(1),
            args=_args(tmp_path, 2),
            train_dataset=Tokens(),
            callbacks=[AsymstoreCallback(store, every=2)],
        ).train()
    with asymstore.open_store(str(tmp_path / "ck")) as store:
        cb = AsymstoreCallback(store, every=2, resume=2)
        t = exact_resume(MyTrainer(model=_model(2), args=_args(tmp_path, 4), train_dataset=Tokens(), callbacks=[cb]))
        assert isinstance(t, MyTrainer) and isinstance(t, AsymstoreResumeMixin)
        assert exact_resume(t) is t and type(exact_resume(t)) is type(t)
        t.train()
        assert cb.restored_step == 2 and t.state.global_step == 4
    with pytest.raises(TypeError):
        exact_resume(object())
