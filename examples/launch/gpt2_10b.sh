#!/usr/bin/env bash
# GPT-2 10B (the reference run_clm_no_trainer_ds_gpt2_layer_10B_asym.sh), ZeRO-3, e.g. 4 nodes x 8 GPUs.
# Usage: examples/launch/gpt2_10b.sh [more flags for examples/gpt2.py, e.g. --data PATH --resume]
# Environment: see _common.sh (HOSTFILE, NODES, GPUS, CKPT, HDFS, DS_CONFIG, STRATEGY).
source "$(dirname "$0")/_common.sh"
launch gpt2 10b --steps 1000 --every 50 "$@"
