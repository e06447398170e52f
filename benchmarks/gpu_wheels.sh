#!/usr/bin/env bash
# Wheels of the packages a GPU machine lacks (DeepSpeed without compiled ops, diffusers, their dependencies),
# made here from the versions installed in this environment (the ones the suite passes with), for CPython 3.12
# on x86-64 Linux: the machine has no network, so what it lacks travels with the checkout.
#
#   bash benchmarks/gpu_wheels.sh [DEST]         (DEST: default .whl/, ignored by git)
#
# Then on the GPU machine, from the checkout (gpu_check.sh installs them into a folder of its own on its
# PYTHONPATH, each only where the machine's own version differs):
#
#   OUT=results bash benchmarks/gpu_check.sh
#
# DALI (its CUDA wheel is about 200 MB) and flash-attn (no wheel without a CUDA build) do not travel: their
# steps and tests say they were skipped.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.whl}
PY=${PYTHON:-python}
mkdir -p "$DEST"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PURE=(deepspeed diffusers)  # built here from their sources if need be: DS_BUILD_OPS=0 keeps DeepSpeed pure Python
# diffusers needs huggingface-hub >= 1.32, newer than the one an older timm may have brought: it travels too,
# with what it needs; each is installed there only where the machine's own version differs.
DEPS=(einops hjson msgpack ninja psutil py-cpuinfo pydantic pydantic-core annotated-types typing-inspection
      importlib-metadata zipp regex requests urllib3 idna certifi charset-normalizer
      huggingface-hub hf-xet httpx2 httpcore2 h11 anyio truststore click)
pins() { for name in "$@"; do echo "$name==$(version "$name")"; done; }
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" $(pins "${PURE[@]}")
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" $(pins "${DEPS[@]}")
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST (the device takes 64 MiB with the tree)"
echo "gpu_wheels: on the GPU machine, from the checkout: OUT=results bash benchmarks/gpu_check.sh"
