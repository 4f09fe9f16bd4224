#!/usr/bin/env bash
# ViT-H/14 image classification on ImageNet folders, ZeRO-3, one or more nodes.
# Usage: examples/launch/vit_huge.sh [more flags for examples/vit.py, e.g. --data PATH --resume]
# Environment: see _common.sh (HOSTFILE, NODES, GPUS, CKPT, HDFS, DS_CONFIG, STRATEGY).
source "$(dirname "$0")/_common.sh"
launch vit huge --steps 5000 --every 500 "$@"
