#!/usr/bin/env bash
# Check a machine with one CUDA GPU from a plain checkout, nothing installed by pip: the measurements we most
# want first, each step under its own time limit, sized to finish in 8 minutes on an H100 cold compiles
# included, and at most four files of results.
#
#   bash benchmarks/gpu_wheels.sh          # here, once: wheels of what the GPU machine lacks, into .whl/
#   bash benchmarks/gpu_check.sh [OUT]     # there: results in $OUT (from the environment), else OUT, else gpu_check/
#
# Writes OUT/summary.md (the numbers: kernel bandwidth against the card's own copy bandwidth, the training
# step's s/step, images/s, TFLOP/s and MFU against the plain reference step, the CUDA-graph sampler against
# eager and torch's reduce-overhead, the attention backends, the CUDA-only tests with their skips; a row per
# step), OUT/benchmarks.md (every benchmark table), OUT/results.json (every benchmark row, merged) and
# OUT/logs.tar.gz (a log per step).
#
# The checkout is made importable without installing it: a package view (dfm/ with kernels/ and launch/
# linked in as dfm.kernels and dfm.launch, as setup.py maps them) goes first on PYTHONPATH, and
# PYTHONSAFEPATH keeps `python -m` from putting the checkout's own dfm/ in front of it. Wheels in .whl/
# (or $WHEELS) of packages the machine lacks are installed into a folder on that path; a step whose package
# is missing still runs and names what it skipped. Every step is stopped with SIGINT at its limit, so pytest
# still writes the benchmark rows it finished.
#
# Without CUDA the same script is a dry run (tests/test_gpu_check.py runs it in CI): the environment check,
# every benchmark step's selection collected (each must select something), every CUDA-only test run (all
# skip), every benchmark module imported, the copy and eager kernel benchmarks timed on the CPU, and the same
# four files, the summary saying "no CUDA device".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-${1:-gpu_check}}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
# The interpreter: $PYTHON, else the first of python3 and python that has torch (the machine's may be either).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if "$candidate" -c 'import torch' 2>/dev/null; then PY=$candidate; break; fi
  done
  PY=${PY:-python3}
fi
WHEELS=${WHEELS:-$ROOT/.whl}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS" "$WORK/json" "$WORK/site" "$WORK/view/dfm"
trap 'rm -rf "$WORK"' EXIT

# The package view: links, so files resolve into the checkout (configs/, git commit) as from an install.
for entry in "$ROOT"/dfm/*; do ln -s "$entry" "$WORK/view/dfm/"; done
ln -s "$ROOT/kernels" "$WORK/view/dfm/kernels"
ln -s "$ROOT/launch" "$WORK/view/dfm/launch"
export PYTHONPATH="$WORK/view:$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}
# A test that fails for want of one of these reports "needs <package>" as a skip (tests/conftest.py).
export DFM_OPTIONAL_PACKAGES=deepspeed,diffusers,nvidia.dali,flash_attn

printf 'step\tstatus\tseconds\tlimit\n' > "$WORK/steps.tsv"
total_start=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-480}  # seconds for all steps; a step's limit shrinks to what is left of it

step() {  # step NAME LIMIT_S COMMAND...: run under a time limit (SIGINT, then KILL 20 s later), log, record
  local name=$1 limit=$2 start rc status left
  shift 2
  start=$(date +%s)
  left=$(( BUDGET - 20 - (start - total_start) ))  # 20 s kept for the summary
  if [ "$name" != summary ] && [ "$left" -lt 10 ]; then
    printf '%s\tskipped-no-time\t0\t%d\n' "$name" "$limit" >> "$WORK/steps.tsv"
    echo "gpu_check: $name: skipped, the ${BUDGET} s budget is spent"
    return
  fi
  [ "$name" != summary ] && [ "$left" -lt "$limit" ] && limit=$left
  echo "gpu_check: $name (limit ${limit} s) ..."
  timeout -s INT -k 20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timed-out ;;
    5) status=selected-nothing ;;  # pytest: a -k or -m that matches no test is a broken step, not a pass
    *) status="failed-$rc" ;;
  esac
  printf '%s\t%s\t%d\t%d\n' "$name" "$status" "$(( $(date +%s) - start ))" "$limit" >> "$WORK/steps.tsv"
  echo "gpu_check: $name: $status in $(( $(date +%s) - start )) s"
}

HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEs)
# Each benchmark case is timed for 0.1 s (pytest-benchmark's default is 1 s: the 49 kernel cases alone would
# outlast their step); the train-step and sampler benchmarks set their own rounds.
BENCH=("${PYTEST[@]}" --benchmark-enable --benchmark-warmup=off --benchmark-max-time=0.1 --benchmark-min-rounds=5
       --timeout=0)
TESTS=("${PYTEST[@]}" --continue-on-collection-errors)
DRY=(--collect-only)  # without CUDA each benchmark step only collects its selection: it must select something
XDIST=()
if [ "$HAS_CUDA" = 1 ]; then
  DRY=()
  if "$PY" -c 'import xdist' 2>/dev/null; then
    # The cold Triton and Inductor compiles are CPU-bound: eight workers share the one GPU, each with a
    # share of the cores for Inductor's compile pool (eight pools of all cores would oversubscribe them).
    XDIST=(-n 8)
    export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( $(nproc) / 8 > 1 ? $(nproc) / 8 : 1 ))}
  fi
fi

step wheels 60 "$PY" benchmarks/gpu_check.py install "$WHEELS" "$WORK/site"
step environment 60 "$PY" benchmarks/gpu_check.py env
if ! grep -q '^imports: ok' "$LOGS/environment.log"; then
  echo "gpu_check: the package view does not import: $(grep -m1 '^imports:' "$LOGS/environment.log" || tail -n 1 "$LOGS/environment.log")"
else
  if [ "$HAS_CUDA" != 1 ]; then
    # The dry run's real rows (CPU timings) through the same summary, and every benchmark module imported.
    step kernels_cpu 120 env DFM_BENCH_THREADS=1 "${BENCH[@]}" --benchmark-json="$WORK/json/kernels_cpu.json" \
      --benchmark-max-time=0.05 -k "copy or eager" benchmarks/bench_copy.py benchmarks/bench_noising.py
    step benchmarks_import 120 "${PYTEST[@]}" --collect-only benchmarks/bench_*.py
  fi
  # 1. The fused Triton kernels, as a share of the card's own copy bandwidth measured in the same step; the
  #    fused decompose + noise first, as the kernel a training step runs.
  step kernels 50 "${BENCH[@]}" "${DRY[@]}" --benchmark-json="$WORK/json/kernels.json" -k "copy or eager or triton" \
    benchmarks/bench_copy.py benchmarks/bench_pyramid_noise.py benchmarks/bench_noising.py benchmarks/bench_laplacian.py
  # 2. The training step dfm train runs (engine, bf16 autocast) against the plain one: DFM-SiT-XL/2 at 256 px,
  #    the largest batch that fits both.
  step train_step 130 env DFM_BENCH_MODELS=DFM-SiT-XL/2 DFM_BENCH_BATCH=auto DFM_BENCH_ROUNDS=10 \
    "${BENCH[@]}" "${DRY[@]}" --benchmark-json="$WORK/json/train_step.json" -k "reference or engine]" \
    benchmarks/bench_train_step.py
  # 3. The sampler at batch 16, 50 NFE (40 + 10 steps, no guidance): eager, our CUDA graphs, torch's (two
  #    cold XL/2 compiles: Inductor's cache does not carry across the two modes).
  step sampler 130 env DFM_BENCH_MODEL=DFM-SiT-XL/2 DFM_BENCH_BATCHES=16 DFM_BENCH_STEPS=40,10 DFM_BENCH_CFG=0 \
    DFM_BENCH_ROUNDS=5 "${BENCH[@]}" "${DRY[@]}" --benchmark-json="$WORK/json/sampler.json" \
    -k "eager or cudagraph or overhead" benchmarks/bench_sampling.py
  # 4. The attention backends at the S/B and XL shapes (flash-attn when installed).
  step attention 30 "${BENCH[@]}" "${DRY[@]}" --benchmark-json="$WORK/json/attention.json" benchmarks/bench_attention.py
  # 5. Every CUDA-only test but the compiling ones, then those, then the compile provider of the kernels.
  step cuda_tests 90 "${TESTS[@]}" "${XDIST[@]}" --timeout=60 -m cuda -k "not compile and not graph" tests
  step cuda_compile_tests 80 "${TESTS[@]}" "${XDIST[@]}" --timeout=70 -m cuda -k "compile or graph" tests
  step kernels_compile 40 "${BENCH[@]}" "${DRY[@]}" --benchmark-json="$WORK/json/kernels_compile.json" -k compile \
    benchmarks/bench_pyramid_noise.py benchmarks/bench_noising.py benchmarks/bench_laplacian.py
fi
step summary 30 "$PY" benchmarks/gpu_check.py summary "$WORK" "$OUT" --seconds "$(( $(date +%s) - total_start ))"
cat "$LOGS/summary.log"
echo "gpu_check: $(( $(date +%s) - total_start )) s in all; results in $OUT"
[ -s "$OUT/summary.md" ] && cat "$OUT/summary.md"
