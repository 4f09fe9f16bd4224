#!/usr/bin/env bash
# GPT-2 XL (1.5B), ZeRO-3 on one node: GPUS=8 examples/launch/gpt2_xl.sh (no hostfile needed).
# Usage: examples/launch/gpt2_xl.sh [more flags for examples/gpt2.py, e.g. --data PATH --resume]
# Environment: see _common.sh (HOSTFILE, NODES, GPUS, CKPT, HDFS, DS_CONFIG, STRATEGY).
source "$(dirname "$0")/_common.sh"
launch gpt2 xl --steps 1000 --every 50 "$@"
