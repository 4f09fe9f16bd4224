"""BERT extractive question answering (SQuAD-style start/end logits) with asymstore checkpointing.

    python examples/bert.py                                   # tiny BERT, synthetic question/context pairs
    python examples/bert.py --kill-at 5 && python examples/bert.py --resume
    python examples/bert.py --preset base --data /data/squad/train-v1.1.json   # or train-v2.0.json
    python examples/bert.py --list-presets                    # up to BERT-large and a 10B-parameter BERT

``BertForQuestionAnswering`` is built from a ``BertConfig`` (random init, nothing downloaded);
text is tokenized by the examples' byte-level tokenizer (see asymstore_examples/data.py).
"""

from __future__ import annotations

import argparse
from typing import Any

from asymstore_examples.data import Source, squad_source
from asymstore_examples.runner import Example, Preset, run

PRESETS = {
    "tiny": Preset(
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=512,
            max_position_embeddings=128,
        ),
        4,
        64,
        "CI / laptop",
    ),
    "small": Preset(
        dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048), 16, 384, "BERT-small"
    ),
    "base": Preset(
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        12,
        384,
        "BERT-base 110M",
    ),
    "large": Preset(
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        8,
        384,
        "BERT-large 340M",
    ),
    "10b": Preset(
        dict(hidden_size=4096, num_hidden_layers=48, num_attention_heads=32, intermediate_size=16384),
        2,
        384,
        "ZeRO-3, multi-node (the reference BERT 10B)",
    ),
}


def make_config(p: Preset, args: argparse.Namespace) -> Any:
    from transformers import BertConfig

    c = dict(vocab_size=30522, max_position_embeddings=512)
    c.update(p.config)
    c["max_position_embeddings"] = max(c["max_position_embeddings"], args.size)
    return BertConfig(**c, pad_token_id=0)


def make_model(cfg: Any) -> Any:
    from transformers import BertForQuestionAnswering

    return BertForQuestionAnswering(cfg)


def make_data(args: argparse.Namespace, cfg: Any) -> Source:
    return squad_source(args.data, batch=args.batch, seq=args.size, vocab_size=cfg.vocab_size, seed=args.seed)


EXAMPLE = Example(
    "bert",
    "BERT question answering",
    "text",
    PRESETS,
    make_config,
    make_model,
    make_data,
    data_help="SQuAD v1.1/v2.0 JSON (train-v1.1.json ...) or its directory (default: synthetic)",
)


def main(argv: list[str] | None = None) -> int:
    return run(EXAMPLE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
