#!/usr/bin/env bash
# ResNet-152 on ImageNet folders: data-parallel with ZeRO-3 (ZeRO-1/2 do as well; see DS_CONFIG).
# Usage: examples/launch/resnet152.sh [more flags for examples/resnet.py, e.g. --data PATH --resume]
# Environment: see _common.sh (HOSTFILE, NODES, GPUS, CKPT, HDFS, DS_CONFIG, STRATEGY).
source "$(dirname "$0")/_common.sh"
launch resnet resnet152 --steps 5000 --every 500 "$@"
