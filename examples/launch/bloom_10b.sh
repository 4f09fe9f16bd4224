#!/usr/bin/env bash
# BLOOM 10B causal LM (the reference run_clm_no_trainer_bloom_ds_asym.sh), ZeRO-3, multi-node.
# Usage: examples/launch/bloom_10b.sh [more flags for examples/bloom.py, e.g. --data PATH --resume]
# Environment: see _common.sh (HOSTFILE, NODES, GPUS, CKPT, HDFS, DS_CONFIG, STRATEGY).
source "$(dirname "$0")/_common.sh"
launch bloom 10b --steps 1000 --every 50 "$@"
