#!/usr/bin/env bash
# One entry point that does all set-up on a fresh machine, then runs what was asked.
#   ./run.sh demo   - asymstore in one run: checkpoint overhead, a SIGKILL, a bit-identical resume, the timeline
#                     (examples/demo.py; extra flags go to it, e.g. ./run.sh demo --strategy sync)
#   ./run.sh test   - the whole test suite (./run.sh test-quick skips the slow tests)
#   ./run.sh lint   - ruff (lint + format check) and mypy --strict on asymstore, backends, trainer_hooks
#   ./run.sh bench NAME - a benchmark script from benchmarks/
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${ASYMSTORE_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

# DeepSpeed's FastPersist writer (async I/O op, compared in benchmarks/compare.py) needs libaio's headers: on a
# Debian/Ubuntu machine where we are root, install them once; elsewhere go on without (that variant is skipped)
system_packages() {
  [[ -e /usr/include/libaio.h ]] && return 0
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[asymstore] installing libaio-dev (DeepSpeed's async I/O op)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev >/dev/null; } ||
      echo "[asymstore] libaio-dev could not be installed: the FastPersist comparison is skipped" >&2
  fi
  return 0
}

setup() {
  system_packages
  local stamp="$VENV/.asymstore-setup"
  local want
  # the install builds asymstore/_native.c too: a change to it (or to the build files) means set-up again
  want=$(cat pyproject.toml setup.py asymstore/_native.c | sha256sum | cut -c1-16)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  echo "[asymstore] setting up $VENV (first run downloads torch and friends; later runs reuse it)" >&2
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test,bench,hdfs,s3,deepspeed,lightning]"
  echo "$want" > "$stamp"
}

cmd=${1:-demo}
shift || true
setup
export PATH="$VENV/bin:$PATH"
# DeepSpeed compiles its CPU ops on first use: keep them in a cached place.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/asymstore/torch_extensions}
case "$cmd" in
  demo) PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec python examples/demo.py "$@" ;;
  test)
    if [[ "${CI:-}" == "true" ]]; then export ASYMSTORE_REQUIRE_HDFS=1; export ASYMSTORE_REQUIRE_S3=1; fi
    exec python -m pytest -q "$@" ;;
  test-quick) exec python -m pytest -q -m "not slow" "$@" ;;
  lint)
    ruff check .
    ruff format --check .
    mypy -p asymstore ;;
  bench) name=${1:?usage: ./run.sh bench NAME}; shift; exec python -m "benchmarks.${name%.py}" "$@" ;;
  *) echo "usage: ./run.sh {demo|test|test-quick|lint|bench NAME}" >&2; exit 2 ;;
esac
