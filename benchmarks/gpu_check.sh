#!/usr/bin/env bash
# The GPU check, on a machine with one CUDA GPU and its own python3 with torch (no network): the CUDA tests
# (tests/test_cuda.py: shared-memory slots registered with the CUDA runtime, device-to-host snapshot copies on
# the copy stream, every strategy bit-identical to a synchronous copy, a kill-and-resume from shared memory
# onto the GPU) and the overhead benchmark on the GPU in both regimes (the default one, and the heavy-copy one where
# copying the state is a large share of an iteration). Results go to $OUT (or benchmarks/results/gpu/).
#
#   benchmarks/gpu_wheels.sh           # here, once: the wheels the GPU image lacks, into .whl/
#   benchmarks/gpu_check.sh [--dry-run]  # there (the device tool: carry .whl); --dry-run prints the plan
#
# Budget: <= 8 minutes on one H200 (the tests <= 200 s, the default regime <= 150 s, the heavy one <= 110 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
plan=(
  "install the carried wheels (.whl/*.whl) into /tmp/site and build asymstore._native in place"
  "$PY -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider  -> $OUTDIR/gpu_tests.log"
  "$PY -m benchmarks.bench_overhead --device cuda --variants baseline,sync,checkfreq,uniform,asym,asym-private,torch.save --rounds 3 --block 8 --layers 12 --embd 768 --heads 12 --batch 8 --seq 512 --out $OUTDIR -> overhead.md"
  "$PY -m benchmarks.bench_overhead --device cuda --regime heavy --rounds 3 --block 6 --layers 12 --embd 768 --heads 12 --batch 1 --seq 512 --out $OUTDIR -> overhead_heavy.md"
)
if [[ "${1:-}" == "--dry-run" ]]; then
  printf 'would run:\n'; printf '  %s\n' "${plan[@]}"
  "$PY" -c "import torch; print('  GPU here:', torch.cuda.is_available())" 2>/dev/null || true
  exit 0
fi
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
"$PY" setup.py -q build_ext --inplace > "$OUTDIR/build.log" 2>&1 || echo "native copy not built (see build.log): memmove is used"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTDIR/gpu.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >> "$OUTDIR/gpu.txt" 2>&1
rc=0
timeout 200 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUTDIR/gpu_tests.log" || rc=1
timeout 150 "$PY" -m benchmarks.bench_overhead --device cuda \
  --variants baseline,sync,checkfreq,uniform,asym,asym-private,torch.save --rounds 3 --block 8 \
  --layers 12 --embd 768 --heads 12 --batch 8 --seq 512 --out "$OUTDIR" 2>&1 | tail -40 | tee "$OUTDIR/bench.log" || rc=1
timeout 110 "$PY" -m benchmarks.bench_overhead --device cuda --regime heavy --rounds 3 --block 6 \
  --layers 12 --embd 768 --heads 12 --batch 1 --seq 512 --out "$OUTDIR" 2>&1 | tail -40 | tee "$OUTDIR/bench_heavy.log" || rc=1
exit $rc
