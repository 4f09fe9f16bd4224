"""Shared code of the asymstore examples: the training runner and the data loaders.

The family scripts next to this package (``gpt2.py``, ``bert.py``, ``roberta.py``, ``bloom.py``,
``resnet.py``, ``vit.py``) each declare one :class:`~asymstore_examples.runner.Example`.
"""

from .runner import Example, Preset, run

__all__ = ["Example", "Preset", "run"]
