"""Shared pieces of the trainer-hook tests: a small model with buffers and dropout and a deterministic
training iteration that draws from every RNG (python, numpy, torch); the strict comparison of states is
``tests.helpers.assert_bitequal``."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

D_IN = 32


class Block(nn.Module):
    def __init__(self, d: int, p: float) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)  # running stats: buffers that change in forward
        self.drop = nn.Dropout(p)  # consumes the torch RNG in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.relu(self.bn(self.lin(x))))


class Net(nn.Module):
    def __init__(self, d: int = 128, depth: int = 6, p: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, d)
        self.blocks = nn.Sequential(*[Block(d, p) for _ in range(depth)])
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(
    seed: int = 0, *, d: int = 128, depth: int = 6, lr: float = 1e-2
) -> tuple[Net, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    seed_all(seed)
    model = Net(d, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # step_size=1 so the learning rate (in the optimizer's param_groups) changes every step
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    return model, opt, sched


def batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch drawn from all three RNGs, so each one's state matters for a resume."""
    x = torch.randn(batch_size, D_IN)
    noise = torch.from_numpy(np.random.standard_normal(batch_size).astype(np.float32))
    y = x[:, :4].sum(1) + 0.1 * noise + random.random()
    return x, y.unsqueeze(1)


def iteration(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    batch_size: int,
    before_step: Callable[[float], None] | None = None,
) -> float:
    model.train()
    x, y = batch(batch_size)
    loss = F.mse_loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step(loss.item())
    opt.step()
    sched.step()
    return loss.item()


def rng_snapshot() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state().clone()}


def full_state(
    model: nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int, extras: dict[str, Any]
) -> dict[str, Any]:
    """A synchronous deep copy of the whole training state, shaped like ``AsymCheckpointer.state()``."""
    return copy.deepcopy(
        {
            "rng": rng_snapshot(),
            "step": step,
            "extras": extras,
            "scheduler": sched.state_dict(),
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizers": [opt.state_dict()],
        }
    )


@contextmanager
def deterministic_cpu(threads: int = 1) -> Iterator[None]:
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)
