# Shared by the launch scripts: sourced, not run.
#   NODES    nodes to use from the hostfile (default: all of its lines)
#   GPUS     GPUs per node (default: the hostfile's slots)
#   HOSTFILE default examples/launch/hostfile (none: this node only)
#   CKPT     node-local NVMe directory for checkpoints (default /local_nvme/asymstore/$NAME)
#   HDFS     HDFS URL of the durable tier (default: none), e.g. hdfs://namenode:9000/ckpt
#   DS_CONFIG default examples/launch/ds_zero3.json
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
HOSTFILE=${HOSTFILE:-$HERE/hostfile}
DS_CONFIG=${DS_CONFIG:-$HERE/ds_zero3.json}
MASTER_PORT=${MASTER_PORT:-29500}

launch() {  # launch EXAMPLE PRESET [extra flags for the example]
  local example=$1 preset=$2
  shift 2
  local ckpt=${CKPT:-/local_nvme/asymstore/$example-$preset}
  local ds=(deepspeed --master_port "$MASTER_PORT")
  if [[ -f "$HOSTFILE" ]]; then
    ds+=(--hostfile "$HOSTFILE")
    [[ -n "${NODES:-}" ]] && ds+=(--num_nodes "$NODES")
    [[ -n "${MASTER_ADDR:-}" ]] && ds+=(--master_addr "$MASTER_ADDR")
  fi
  [[ -n "${GPUS:-}" ]] && ds+=(--num_gpus "$GPUS")
  local args=(--preset "$preset" --deepspeed "$DS_CONFIG" --dir "$ckpt" --strategy "${STRATEGY:-asym}")
  [[ -n "${HDFS:-}" ]] && args+=(--hdfs "${HDFS%/}/$example-$preset")
  cd "$ROOT"
  set -x
  exec "${ds[@]}" "examples/$example.py" "${args[@]}" "$@"
}
