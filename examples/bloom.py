"""BLOOM causal language modelling with asymstore checkpointing.

    python examples/bloom.py                                  # tiny BLOOM, synthetic tokens
    python examples/bloom.py --kill-at 5 && python examples/bloom.py --resume
    python examples/bloom.py --preset 560m --data /data/wikitext-103-raw      # wiki.train.raw, byte tokens
    python examples/bloom.py --list-presets                   # BLOOM-560M ... 7B1 and a 10B-parameter BLOOM

``BloomForCausalLM`` is built from a ``BloomConfig`` (random init, nothing downloaded).
"""

from __future__ import annotations

import argparse
from typing import Any

from asymstore_examples.data import Source, causal_lm_source
from asymstore_examples.runner import Example, Preset, run

PRESETS = {
    "tiny": Preset(dict(hidden_size=64, n_layer=2, n_head=2, vocab_size=512), 4, 64, "CI / laptop"),
    "560m": Preset(dict(hidden_size=1024, n_layer=24, n_head=16), 8, 1024, "BLOOM-560M"),
    "1b1": Preset(dict(hidden_size=1536, n_layer=24, n_head=16), 8, 1024, "BLOOM-1B1"),
    "1b7": Preset(dict(hidden_size=2048, n_layer=24, n_head=16), 4, 1024, "BLOOM-1B7"),
    "3b": Preset(dict(hidden_size=2560, n_layer=30, n_head=32), 4, 1024, "BLOOM-3B, ZeRO-3"),
    "7b1": Preset(dict(hidden_size=4096, n_layer=30, n_head=32), 2, 1024, "BLOOM-7B1, ZeRO-3 multi-node"),
    "10b": Preset(
        dict(hidden_size=4096, n_layer=44, n_head=32), 2, 1024, "ZeRO-3 multi-node (the reference BLOOM 10B)"
    ),
}


def make_config(p: Preset, args: argparse.Namespace) -> Any:
    from transformers import BloomConfig

    c = dict(vocab_size=250880)
    c.update(p.config)
    return BloomConfig(**c, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # ALiBi: no position limit


def make_model(cfg: Any) -> Any:
    from transformers import BloomForCausalLM

    return BloomForCausalLM(cfg)


def make_data(args: argparse.Namespace, cfg: Any) -> Source:
    return causal_lm_source(args.data, batch=args.batch, seq=args.size, vocab_size=cfg.vocab_size, seed=args.seed)


EXAMPLE = Example(
    "bloom",
    "BLOOM causal LM",
    "text",
    PRESETS,
    make_config,
    make_model,
    make_data,
    data_help="WikiText raw text: wiki.train.raw or its directory (default: synthetic tokens)",
)


def main(argv: list[str] | None = None) -> int:
    return run(EXAMPLE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
