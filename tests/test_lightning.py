"""Lightning CheckpointIO on asymstore: ModelCheckpoint, resume with ckpt_path=, sync and async."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_bitequal

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

import asymstore  # noqa: E402
from asymstore.errors import CheckpointFailedError, UnsupportedValueError  # noqa: E402
from asymstore.trainer_hooks.lightning import (  # noqa: E402
    AsymstoreCheckpointIO,
    AsyncAsymstoreCheckpointIO,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Tiny(L.LightningModule):
    def __init__(self, seed: int = 0, hidden: int = 16, note: str = "tiny") -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def training_step(self, batch, _i):
        x, y = batch
        self.seen += x.shape[0]
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 8, generator=g)
        ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        return torch.utils.data.DataLoader(ds, batch_size=8)


class AtStart(Callback):
    def __init__(self) -> None:
        self.state: dict | None = None

    def on_train_start(self, trainer, pl_module):  # after the checkpoint was restored
        opt = trainer.optimizers[0]
        self.state = {
            "model": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "exp_avg": [opt.state[p]["exp_avg"].clone() for p in pl_module.parameters()],
            "step": trainer.global_step,
            "lr": opt.param_groups[0]["lr"],
        }


def _trainer(tmp_path: Path, io, max_steps: int, *callbacks):
    ck = ModelCheckpoint(
        dirpath=str(tmp_path / "ckpts"), every_n_train_steps=2, save_top_k=2, monitor="loss", save_last=True
    )
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[io],
        callbacks=[ck, *callbacks],
        default_root_dir=str(tmp_path),
    ), ck


@pytest.mark.parametrize("io_cls", [AsymstoreCheckpointIO, AsyncAsymstoreCheckpointIO], ids=["sync", "async"])
def test_fit_checkpoint_resume_continue(tmp_path, io_cls):
    url = str(tmp_path / "store")
    io = io_cls(url)
    model = Tiny(seed=1)
    trainer, _ck = _trainer(tmp_path, io, 6)
    trainer.fit(model)  # teardown waits for the async saves
    last = tmp_path / "ckpts" / "last.ckpt"
    pointer = json.loads(last.read_text())  # a small JSON pointer; the data is in the store
    assert pointer["format"] == "asymstore-lightning/1" and pointer["store"].endswith("store")
    kept = sorted(p.name for p in (tmp_path / "ckpts").glob("*.ckpt"))
    assert len(kept) == 3, kept  # top-2 + last; removed ones are gone from disk ...
    with asymstore.open_store(url) as st:  # ... and from the store
        assert len(st.steps()) == 3
    final = {k: v.clone() for k, v in model.state_dict().items()}

    io_check = AsymstoreCheckpointIO(url)
    saved = io_check.load_checkpoint(last)
    assert saved["global_step"] == 6 and saved["hyper_parameters"]["note"] == "tiny"
    assert_bitequal(dict(saved["state_dict"]), final)
    io_check.teardown()

    # resume in a fresh model/trainer and continue
    at_start = AtStart()
    model2 = Tiny(seed=2)
    trainer2, _ = _trainer(tmp_path, io_cls(url), 10, at_start)
    trainer2.fit(model2, ckpt_path=str(last))
    assert at_start.state is not None and at_start.state["step"] == 6
    assert_bitequal(at_start.state["model"], final)  # restored weights bit-identical
    saved_opt = saved["optimizer_states"][0]["state"]
    assert_bitequal(at_start.state["exp_avg"], [saved_opt[i]["exp_avg"] for i in range(len(saved_opt))])
    assert at_start.state["lr"] == saved["optimizer_states"][0]["param_groups"][0]["lr"]
    assert trainer2.global_step == 10
    again = AsymstoreCheckpointIO(url).load_checkpoint(last)
    assert again["global_step"] == 10
    assert_bitequal(dict(again["state_dict"]), {k: v for k, v in model2.state_dict().items()})


def test_unsupported_value_names_the_key(tmp_path):
    io = AsymstoreCheckpointIO(str(tmp_path / "store"))
    with pytest.raises(UnsupportedValueError, match="hyper_parameters/loss_fn"):
        io.save_checkpoint(
            {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"loss_fn": object()}}, tmp_path / "a.ckpt"
        )
    assert not (tmp_path / "a.ckpt").exists()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 0, "global_step": 3}, tmp_path / "a.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "a.ckpt")["state_dict"]["w"], torch.ones(2))
    io.remove_checkpoint(tmp_path / "a.ckpt")
    assert not (tmp_path / "a.ckpt").exists() and io.store.steps() == []
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "a.ckpt")
    io.teardown()  # Lightning tears down after each stage: the plugin stays usable
    io.save_checkpoint({"w": torch.zeros(1)}, tmp_path / "b.ckpt")
    io.close()


def test_async_background_error_is_raised_on_next_call(tmp_path):
    io = AsyncAsymstoreCheckpointIO(str(tmp_path / "store"))
    real = io.store.manager.persist_primary

    def broken(*a, **k):
        raise OSError("disk on fire")

    io.store.manager.persist_primary = broken
    io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "x.ckpt")  # returns after the snapshot
    io._wait_all()
    assert not (tmp_path / "x.ckpt").exists()  # never committed: no pointer
    with pytest.raises(CheckpointFailedError, match="disk on fire"):
        io.save_checkpoint({"w": torch.ones(3)}, tmp_path / "y.ckpt")
    io.store.manager.persist_primary = real
    io.save_checkpoint({"w": torch.full((3,), 2.0)}, tmp_path / "z.ckpt")  # delivered once: works again
    assert torch.equal(io.load_checkpoint(tmp_path / "z.ckpt")["w"], torch.full((3,), 2.0))
    io.teardown()
