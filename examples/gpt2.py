"""GPT-2 causal language modelling with asymstore checkpointing.

    python examples/gpt2.py                                  # tiny GPT-2, synthetic tokens, 8 steps
    python examples/gpt2.py --kill-at 5 && python examples/gpt2.py --resume
    python examples/gpt2.py --preset small --data /data/wikitext-103-raw   # wiki.train.raw, byte tokens
    python examples/gpt2.py --preset demo --steps 12         # the model of ./run.sh demo (examples/demo.py)
    python examples/gpt2.py --list-presets                   # sizes up to a 10B-parameter GPT-2

The model is built from a ``GPT2Config`` (random init, nothing downloaded).
"""

from __future__ import annotations

import argparse
from typing import Any

from asymstore_examples.data import Source, causal_lm_source
from asymstore_examples.runner import Example, Preset, run

# n_embd / n_layer / n_head; the 2.7B..10B sizes follow the reference "GPT-2 10B" runs (12 * L * d^2 parameters)
PRESETS = {
    "tiny": Preset(dict(n_embd=64, n_layer=2, n_head=2, vocab_size=512, n_positions=128), 4, 64, "CI / laptop"),
    # the model of `./run.sh demo`: 4.2M parameters, 48.5 MiB of state
    "demo": Preset(dict(n_embd=256, n_layer=4, n_head=4, vocab_size=4096, n_positions=128), 8, 128, "./run.sh demo"),
    "small": Preset(dict(n_embd=768, n_layer=12, n_head=12), 8, 1024, "GPT-2 124M"),
    "medium": Preset(dict(n_embd=1024, n_layer=24, n_head=16), 8, 1024, "GPT-2 355M"),
    "large": Preset(dict(n_embd=1280, n_layer=36, n_head=20), 4, 1024, "GPT-2 774M"),
    "xl": Preset(dict(n_embd=1600, n_layer=48, n_head=25), 4, 1024, "GPT-2 1.5B"),
    "2.7b": Preset(dict(n_embd=2560, n_layer=32, n_head=32), 4, 1024, "ZeRO-3, multi-GPU"),
    "6.7b": Preset(dict(n_embd=4096, n_layer=32, n_head=32), 2, 1024, "ZeRO-3, multi-node"),
    "10b": Preset(dict(n_embd=4096, n_layer=48, n_head=32), 2, 1024, "ZeRO-3, multi-node (the reference GPT-2 10B)"),
}


def make_config(p: Preset, args: argparse.Namespace) -> Any:
    from transformers import GPT2Config

    c = dict(vocab_size=50257, n_positions=1024)
    c.update(p.config)
    c["n_positions"] = max(c["n_positions"], args.size)
    return GPT2Config(**c, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_model(cfg: Any) -> Any:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(cfg)


def make_data(args: argparse.Namespace, cfg: Any) -> Source:
    return causal_lm_source(args.data, batch=args.batch, seq=args.size, vocab_size=cfg.vocab_size, seed=args.seed)


EXAMPLE = Example(
    "gpt2",
    "GPT-2 causal LM",
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
