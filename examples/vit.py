"""ViT image classification with asymstore checkpointing.

    python examples/vit.py                                    # tiny ViT, synthetic 32px images
    python examples/vit.py --kill-at 5 && python examples/vit.py --resume
    python examples/vit.py --preset base --data /data/imagenet  # class folders (train/n01440764/...)
    python examples/vit.py --list-presets                     # ViT-Base, -Large, -Huge

``ViTForImageClassification`` is built from a ``ViTConfig`` (random init, nothing downloaded);
images are decoded with PIL (torchvision is not needed).
"""

from __future__ import annotations

import argparse
from typing import Any

from asymstore_examples.data import Source, count_classes, image_source
from asymstore_examples.runner import Example, Preset, run

PRESETS = {
    "tiny": Preset(
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            patch_size=8,
            num_labels=10,
        ),
        8,
        32,
        "CI / laptop",
    ),
    "small": Preset(
        dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536), 64, 224, "ViT-S/16"
    ),
    "base": Preset(
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        64,
        224,
        "ViT-B/16 86M",
    ),
    "large": Preset(
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        32,
        224,
        "ViT-L/16 304M",
    ),
    "huge": Preset(
        dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120, patch_size=14),
        16,
        224,
        "ViT-H/14 632M, ZeRO-3 multi-GPU",
    ),
}


def make_config(p: Preset, args: argparse.Namespace) -> Any:
    from transformers import ViTConfig

    c: dict[str, Any] = dict(patch_size=16, num_labels=1000)
    c.update(p.config)
    c["image_size"] = args.size
    if args.data:
        c["num_labels"] = count_classes(args.data) or c["num_labels"]
    return ViTConfig(**c)


def make_model(cfg: Any) -> Any:
    from transformers import ViTForImageClassification

    return ViTForImageClassification(cfg)


def make_data(args: argparse.Namespace, cfg: Any) -> Source:
    src, _ = image_source(args.data, batch=args.batch, image_size=args.size, num_labels=cfg.num_labels, seed=args.seed)
    return src


EXAMPLE = Example(
    "vit",
    "ViT image classification",
    "image",
    PRESETS,
    make_config,
    make_model,
    make_data,
    data_help="ImageNet-style class folders (root/train/<class>/*.JPEG) (default: synthetic images)",
)


def main(argv: list[str] | None = None) -> int:
    return run(EXAMPLE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
