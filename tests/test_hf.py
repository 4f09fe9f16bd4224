"""Hugging Face Trainer + AsymstoreCallback: checkpoint, restore into a fresh Trainer, continue."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_bitequal

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install asymstore[hf])")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import asymstore  # noqa: E402
from asymstore.trainer_hooks.hf import AsymstoreCallback  # noqa: E402


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
