#!/usr/bin/env bash
# Fetch, here (where PyPI is reachable), the wheels asymstore needs that the GPU machine's image lacks
# (it has torch, numpy, pytest, hypothesis, transformers, safetensors, rich; not zarr and its codecs), for its
# Python 3.12 on x86-64, into .whl/ (ignored by git; carried to the GPU machine with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
mkdir -p .whl
for spec in zarr==3.1.6 donfig==0.8.1.post1 numcodecs==0.16.6 crc32c==2.9.post0 google-crc32c==1.9.0 \
            typing_extensions==4.16.0 pyyaml==6.0.4 packaging==26.4 pytest-timeout==2.4.0; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
ls -la .whl
