#!/usr/bin/env bash
# BERT-large question answering on SQuAD, ZeRO-3 on one node: GPUS=8 examples/launch/bert_large.sh --data train-v1.1.json
# Usage: examples/launch/bert_large.sh [more flags for examples/bert.py, e.g. --data PATH --resume]
# Environment: see _common.sh (HOSTFILE, NODES, GPUS, CKPT, HDFS, DS_CONFIG, STRATEGY).
source "$(dirname "$0")/_common.sh"
launch bert large --steps 1000 --every 50 "$@"
