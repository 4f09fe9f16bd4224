#!/usr/bin/env bash
# BERT 10B question answering on SQuAD (the reference run_squad_ds_z3_bert_10B_asym.sh), ZeRO-3, multi-node.
# Usage: examples/launch/bert_10b.sh [more flags for examples/bert.py, e.g. --data PATH --resume]
# Environment: see _common.sh (HOSTFILE, NODES, GPUS, CKPT, HDFS, DS_CONFIG, STRATEGY).
source "$(dirname "$0")/_common.sh"
launch bert 10b --steps 1000 --every 50 "$@"
