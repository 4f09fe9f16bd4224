"""The six model families of the comparison benchmark (GPT-2, BERT, RoBERTa, BLOOM, ResNet, ViT), built from
the examples' family definitions (``examples/<family>.py``: transformers configs, random init, nothing
downloaded; their synthetic data sources) at a CPU-sized preset.

Presets: ``tiny`` is each example's own CI preset; ``cpu`` is defined here, a few million parameters per family
(tens of MiB of training state with AdamW), an iteration of a few hundred ms on two cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from benchmarks._harness import ROOT

FAMILIES = ("gpt2", "bert", "roberta", "bloom", "resnet", "vit")

_EXAMPLES = os.path.join(ROOT, "examples")

#: ``cpu``: config overrides on top of the example's ``make_config`` defaults, batch, sequence length / image side
CPU_PRESETS: dict[str, tuple[dict[str, Any], int, int]] = {
    "gpt2": (dict(n_embd=256, n_layer=4, n_head=4, vocab_size=4096, n_positions=128), 8, 128),
    "bert": (
        dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            vocab_size=4096,
            max_position_embeddings=128,
        ),
        8,
        128,
    ),
    "roberta": (
        dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            vocab_size=4096,
            max_position_embeddings=130,
        ),
        8,
        128,
    ),
    "bloom": (dict(hidden_size=256, n_layer=4, n_head=4, vocab_size=4096), 8, 128),
    "resnet": (
        dict(
            embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1], layer_type="basic", num_labels=100
        ),
        16,
        64,
    ),
    "vit": (
        dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            patch_size=8,
            num_labels=100,
        ),
        16,
        64,
    ),
}


def example_module(family: str) -> ModuleType:
    """``examples/<family>.py`` (its ``EXAMPLE``: presets, config, model, data), imported once."""
    if family not in FAMILIES:
        raise SystemExit(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    name = f"_asymstore_example_{family}"
    if name in sys.modules:
        return sys.modules[name]
    if _EXAMPLES not in sys.path:  # the family files import their shared package asymstore_examples
        sys.path.insert(0, _EXAMPLES)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    spec = importlib.util.spec_from_file_location(name, os.path.join(_EXAMPLES, f"{family}.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Family:
    """One family at one preset: a model, its AdamW, a fixed pool of synthetic batches, and how to rebuild it."""

    name: str
    title: str
    preset: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    batches: list[dict[str, torch.Tensor]]
    config: Any
    batch: int
    size: int
    seed: int
    _i: int = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        b = self.batches[self._i % len(self.batches)]
        self._i += 1
        return b

    def fresh(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """A new model and AdamW of the same shapes (another seed), to restore into."""
        ex = example_module(self.name).EXAMPLE
        torch.manual_seed(self.seed + 12345)
        model = ex.make_model(self.config)
        model.train()
        return model, make_optimizer(model)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> str:
        kind = "image side" if self.name in ("resnet", "vit") else "sequence"
        return f"{self.title}: {self.n_params / 1e6:.2f}M parameters, batch {self.batch} x {kind} {self.size}"


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


def build(family: str, preset: str = "cpu", *, seed: int = 0, pool: int = 4) -> Family:
    """``family`` at ``preset`` (``cpu`` or any of the example's presets, e.g. ``tiny``), seeded; AdamW."""
    mod = example_module(family)
    ex = mod.EXAMPLE
    if preset == "cpu":
        cfg_over, batch, size = CPU_PRESETS[family]
        p = mod.Preset(cfg_over, batch, size, "CPU benchmark")
    elif preset in ex.presets:
        p = ex.presets[preset]
        batch, size = p.batch, p.size
    else:
        raise SystemExit(f"unknown preset {preset!r} for {family}; choose cpu or one of {', '.join(ex.presets)}")
    args = argparse.Namespace(size=size, batch=batch, data=None, seed=seed)
    cfg = ex.make_config(p, args)
    torch.manual_seed(seed)
    model = ex.make_model(cfg)
    model.train()
    # dropout off: every variant trains the same arithmetic (a restored state continues bit for bit)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    source = ex.make_data(args, cfg)
    batches = [dict(source.batch(k)) for k in range(pool)]
    return Family(family, ex.title, preset, model, make_optimizer(model), batches, cfg, batch, size, seed)


def train_step(fam: Family) -> None:
    """One forward, backward and AdamW step on the family's next batch."""
    loss = fam.model(**fam.next_batch()).loss
    loss.backward()
    fam.opt.step()
    fam.opt.zero_grad(set_to_none=True)
