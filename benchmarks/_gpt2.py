"""The benchmarks' GPT-2 training setup: a transformers config (nothing downloaded), AdamW, synthetic tokens."""

from __future__ import annotations

import argparse

import torch


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """GPT-2 from ``args.vocab/seq/embd/layers/heads`` (dropout 0, seeded by ``args.seed``) and its AdamW."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    cfg = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq,
        n_embd=args.embd,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).to(getattr(args, "device", "cpu"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    return model, opt


class Data:
    """Synthetic token batches of ``args.batch x args.seq`` from a seeded RNG (a fixed pool of 8, cycled)."""

    def __init__(self, args: argparse.Namespace) -> None:
        g = torch.Generator().manual_seed(args.seed + 1)
        device = getattr(args, "device", "cpu")
        self.pool = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(8)]
        self.i = 0

    def next(self) -> torch.Tensor:
        x = self.pool[self.i % len(self.pool)]
        self.i += 1
        return x


def add_model_args(p: argparse.ArgumentParser, *, layers: int, batch: int, seq: int) -> None:
    """The options :func:`build_model` and :class:`Data` read (defaults per benchmark for the sizes)."""
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the model trains: cpu or cuda")
