"""Trainer integrations: one module per framework."""

from .torch_hooks import STRATEGIES, AsymCheckpointer

__all__ = ["STRATEGIES", "AsymCheckpointer"]
