#!/usr/bin/env bash
# BLOOM-7B1 causal LM, ZeRO-3, multi-node.
# Usage: examples/launch/bloom_7b1.sh [more flags for examples/bloom.py, e.g. --data PATH --resume]
# Environment: see _common.sh (HOSTFILE, NODES, GPUS, CKPT, HDFS, DS_CONFIG, STRATEGY).
source "$(dirname "$0")/_common.sh"
launch bloom 7b1 --steps 1000 --every 50 "$@"
