#!/usr/bin/env bash
# RoBERTa 10B masked LM (the reference run_mlm_no_trainer_roberta_ds_asym.sh), ZeRO-3, multi-node.
# Usage: examples/launch/roberta_10b.sh [more flags for examples/roberta.py, e.g. --data PATH --resume]
# Environment: see _common.sh (HOSTFILE, NODES, GPUS, CKPT, HDFS, DS_CONFIG, STRATEGY).
source "$(dirname "$0")/_common.sh"
launch roberta 10b --steps 1000 --every 50 "$@"
