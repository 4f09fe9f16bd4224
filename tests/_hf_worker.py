"""A Hugging Face Trainer run checkpointed by AsymstoreCallback, for tests/test_hf.py (run as a script).

``python -m tests._hf_worker CKDIR OUT.jsonl MAX_STEPS EVERY GRAD_ACC [KILL_AT]``: trains a tiny GPT-2 (dropout
on, so the RNG states matter) on a shuffled toy dataset with ``AsymstoreTrainer``, resuming from CKDIR when it
holds a checkpoint. Each micro-batch appends ``{"step", "loss" (float.hex), "first_tokens"}`` to OUT.jsonl. With
KILL_AT, the process SIGKILLs itself at the end of that optimizer step, once the newest checkpoint taken
before it is durable on the tier.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

import asymstore
from asymstore.trainer_hooks.hf import AsymstoreCallback, AsymstoreTrainer


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int = 48, seq: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (n, seq), generator=g)
        self.x[:, 0] = torch.arange(n)  # the first token names the sample: the data order is visible

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Recording(AsymstoreTrainer):
    """Writes the exact loss of every micro-batch and which samples it held."""

    out: Any = None

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss: torch.Tensor = super().training_step(model, inputs, num_items_in_batch)
        rec = {
            "step": self.state.global_step + 1,
            "loss": float(loss.detach().float()).hex(),
            "first_tokens": inputs["input_ids"][:, 0].tolist(),
        }
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()
        return loss


class KillAt(TrainerCallback):
    def __init__(self, store: asymstore.Store, step: int, every: int) -> None:
        self.store, self.step, self.every = store, step, every

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step != self.step:
            return
        want = (self.step - 1) // self.every * self.every  # the newest checkpoint taken before this step
        deadline = time.monotonic() + 60
        while (self.store.latest_durable_step() or 0) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"killing at step {self.step}; durable {self.store.latest_durable_step()}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ckdir, out_path, max_steps, every, grad_acc = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    kill_at = int(sys.argv[6]) if len(sys.argv) > 6 else None
    torch.set_num_threads(1)  # deterministic CPU kernels
    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out_path), "hf-out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_acc,
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
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1)
    model = GPT2LMHeadModel(cfg)
    store = asymstore.open_store(ckdir)
    cb = AsymstoreCallback(store, every=every, resume=True)
    callbacks: list[TrainerCallback] = [cb]
    if kill_at is not None:
        callbacks.append(KillAt(store, kill_at, every))
    with open(out_path, "a") as out:
        trainer = Recording(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
        trainer.out = out
        trainer.train()
    print(f"done; resumed from {cb.restored_step}", flush=True)
    store.close()


if __name__ == "__main__":
    main()
