"""ResNet image classification with asymstore checkpointing (BatchNorm buffers included).

    python examples/resnet.py                                 # tiny ResNet, synthetic 32px images
    python examples/resnet.py --kill-at 5 && python examples/resnet.py --resume
    python examples/resnet.py --preset resnet50 --data /data/imagenet         # class folders (train/n01440764/...)
    python examples/resnet.py --list-presets                  # ResNet-18 ... ResNet-152

``ResNetForImageClassification`` is built from a ``ResNetConfig`` (random init, nothing downloaded);
images are decoded with PIL (torchvision is not needed).
"""

from __future__ import annotations

import argparse
from typing import Any

from asymstore_examples.data import Source, count_classes, image_source
from asymstore_examples.runner import Example, Preset, run

_BASIC = dict(layer_type="basic", hidden_sizes=[64, 128, 256, 512])
_BOTTLENECK = dict(layer_type="bottleneck", hidden_sizes=[256, 512, 1024, 2048])
PRESETS = {
    "tiny": Preset(
        dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10),
        8,
        32,
        "CI / laptop",
    ),
    "resnet18": Preset(dict(_BASIC, depths=[2, 2, 2, 2]), 64, 224, "ResNet-18"),
    "resnet34": Preset(dict(_BASIC, depths=[3, 4, 6, 3]), 64, 224, "ResNet-34"),
    "resnet50": Preset(dict(_BOTTLENECK, depths=[3, 4, 6, 3]), 64, 224, "ResNet-50"),
    "resnet101": Preset(dict(_BOTTLENECK, depths=[3, 4, 23, 3]), 64, 224, "ResNet-101"),
    "resnet152": Preset(dict(_BOTTLENECK, depths=[3, 8, 36, 3]), 32, 224, "ResNet-152, multi-GPU"),
}


def make_config(p: Preset, args: argparse.Namespace) -> Any:
    from transformers import ResNetConfig

    c: dict[str, Any] = dict(embedding_size=64, num_labels=1000)
    c.update(p.config)
    if args.data:
        c["num_labels"] = count_classes(args.data) or c["num_labels"]
    return ResNetConfig(**c)


def make_model(cfg: Any) -> Any:
    from transformers import ResNetForImageClassification

    return ResNetForImageClassification(cfg)


def make_data(args: argparse.Namespace, cfg: Any) -> Source:
    src, _ = image_source(args.data, batch=args.batch, image_size=args.size, num_labels=cfg.num_labels, seed=args.seed)
    return src


EXAMPLE = Example(
    "resnet",
    "ResNet image classification",
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
