#!/usr/bin/env bash
# The main job: installs missing Debian packages, builds every bench in Release for this machine
# (-march=native), runs them (medians of repetitions), prints a comparison table and writes
# bench-results/*.json plus bench-results/throughput.png.
# Usage: bash bench/run.sh [benchmark-filter-regex]
# Env: ATTNKIT_BENCH_REPS (default 3), ATTNKIT_BENCH_MIN_TIME (seconds per repetition, default 0.2)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build-bench"
results="$root/bench-results"
filter="${1:-.}"
bash "$root/.ci/install-deps.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DATTNKIT_MARCH=native \
      -DATTNKIT_BUILD_TESTS=OFF -DATTNKIT_BUILD_BENCH=ON -DATTNKIT_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$build" -j "$(nproc)"
mkdir -p "$results"
for exe in "$build"/bench/bench_*; do
  [ -x "$exe" ] || continue
  name="$(basename "$exe")"
  echo "== $name"
  "$exe" --benchmark_filter="$filter" \
         --benchmark_repetitions="${ATTNKIT_BENCH_REPS:-3}" --benchmark_report_aggregates_only=true \
         --benchmark_min_time="${ATTNKIT_BENCH_MIN_TIME:-0.2}" \
         --benchmark_out="$results/$name.json" --benchmark_out_format=json >/dev/null
done
/usr/bin/python3 "$root/bench/report.py" "$results"
