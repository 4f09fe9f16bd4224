"""RoBERTa masked language modelling with asymstore checkpointing.

    python examples/roberta.py                                # tiny RoBERTa, synthetic tokens, 15% masked
    python examples/roberta.py --kill-at 5 && python examples/roberta.py --resume
    python examples/roberta.py --preset base --data /data/wikitext-103-raw     # wiki.train.raw, byte tokens
    python examples/roberta.py --list-presets                 # up to RoBERTa-large and a 10B-parameter RoBERTa

``RobertaForMaskedLM`` is built from a ``RobertaConfig`` (random init, nothing downloaded).
"""

from __future__ import annotations

import argparse
from typing import Any

from asymstore_examples.data import Source, masked_lm_source
from asymstore_examples.runner import Example, Preset, run

PRESETS = {
    "tiny": Preset(
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=512,
            max_position_embeddings=130,
        ),
        4,
        64,
        "CI / laptop",
    ),
    "base": Preset(
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        16,
        512,
        "RoBERTa-base 125M",
    ),
    "large": Preset(
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        8,
        512,
        "RoBERTa-large 355M",
    ),
    "10b": Preset(
        dict(hidden_size=4096, num_hidden_layers=48, num_attention_heads=32, intermediate_size=16384),
        2,
        512,
        "ZeRO-3, multi-node (the reference RoBERTa 10B run)",
    ),
}


def make_config(p: Preset, args: argparse.Namespace) -> Any:
    from transformers import RobertaConfig

    c = dict(vocab_size=50265, max_position_embeddings=514)
    c.update(p.config)
    # RoBERTa numbers positions from pad_token_id + 1
    c["max_position_embeddings"] = max(c["max_position_embeddings"], args.size + 2)
    return RobertaConfig(**c, pad_token_id=0, bos_token_id=1, eos_token_id=2, type_vocab_size=1)


def make_model(cfg: Any) -> Any:
    from transformers import RobertaForMaskedLM

    return RobertaForMaskedLM(cfg)


def make_data(args: argparse.Namespace, cfg: Any) -> Source:
    return masked_lm_source(args.data, batch=args.batch, seq=args.size, vocab_size=cfg.vocab_size, seed=args.seed)


EXAMPLE = Example(
    "roberta",
    "RoBERTa masked LM",
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
