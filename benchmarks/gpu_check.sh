#!/usr/bin/env bash
# Check an install on a machine with one CUDA GPU: every CUDA-only test, then a short pass of every GPU
# benchmark, each step under its own time limit (460 s in all), and one summary table.
#
#   bash benchmarks/gpu_check.sh [OUT]        (OUT: results folder, default gpu_check/)
#
# Writes OUT/summary.md (a row per step: status, seconds, its last result line), OUT/benchmarks.md (the
# benchmark tables, rendered by benchmarks/render.py from OUT/*.json) and one log per step. A step whose
# dependency is missing (deepspeed, nvidia-dali, flash-attn) reports it and the others still run. Without a
# GPU the script still runs (the CUDA tests show as skipped, the benchmarks time their CPU cases) but its
# numbers are not GPU numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
BENCH=(-p no:cacheprovider --benchmark-enable --benchmark-min-rounds=3 --benchmark-max-time=0.1 --benchmark-warmup=off)
SUMMARY="$OUT/summary.md"
printf '| step | status | seconds | result |\n|---|---|---:|---|\n' > "$SUMMARY"
total_start=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log it, add a summary row
  local name=$1 limit=$2
  shift 2
  local start rc status last
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out (${limit} s)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  last=$(grep -E "passed|failed|error|skipped|Error|GPU|torch" "$OUT/$name.log" | tail -n 1 | tr '|' '/' | cut -c1-160)
  printf '| %s | %s | %d | %s |\n' "$name" "$status" "$(( $(date +%s) - start ))" "$last" >> "$SUMMARY"
  echo "gpu_check: $name: $status"
}

step environment 20 "$PY" -c "
import importlib.util, torch, triton
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
have = {n: importlib.util.find_spec(n) is not None for n in ('deepspeed', 'nvidia.dali', 'flash_attn', 'diffusers')}
print(f'GPU: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton.__version__}; '
      + ', '.join(f'{n} {\"yes\" if ok else \"missing\"}' for n, ok in have.items()))
"
# Every CUDA-only test (the suite's conftest marks them; a module whose import fails is reported, not fatal).
step cuda_tests 170 "$PY" -m pytest -m cuda -q -p no:cacheprovider --timeout=150 -rs --continue-on-collection-errors
step kernels_bench 50 "$PY" -m pytest "${BENCH[@]}" --benchmark-json="$OUT/kernels.json" \
  benchmarks/bench_laplacian.py benchmarks/bench_noising.py benchmarks/bench_pyramid_noise.py
step attention_bench 30 "$PY" -m pytest "${BENCH[@]}" --benchmark-json="$OUT/attention.json" benchmarks/bench_attention.py
# The compiled provider is left to the full benchmark: its cold compile alone can take a minute.
step train_step_bench 100 env DFM_BENCH_ROUNDS=5 "$PY" -m pytest "${BENCH[@]}" --benchmark-json="$OUT/train_step.json" \
  benchmarks/bench_train_step.py -k "not compile"
step sampler_bench 50 env DFM_BENCH_ROUNDS=3 "$PY" -m pytest "${BENCH[@]}" --benchmark-json="$OUT/sampler.json" \
  benchmarks/bench_sampling.py
step loader_bench 30 "$PY" -m pytest "${BENCH[@]}" --benchmark-json="$OUT/loader.json" benchmarks/bench_loader.py
step render 10 "$PY" benchmarks/render.py "$OUT"/*.json --md "$OUT/benchmarks.md"

echo "gpu_check: $(( $(date +%s) - total_start )) s in all; summary in $SUMMARY, benchmark tables in $OUT/benchmarks.md"
cat "$SUMMARY"
