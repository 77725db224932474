#!/usr/bin/env bash
# The whole test suite: installs missing Debian packages, builds the tests in Release with
# assertions kept, for this machine's instruction set, and runs them through ctest.
# Usage: bash tests/run.sh [build-dir]   (default build-tests)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build-tests}"
bash "$root/.ci/install-deps.sh"
jobs="$(nproc)"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DATTNKIT_MARCH=native \
      -DATTNKIT_BUILD_TESTS=ON -DATTNKIT_BUILD_BENCH=OFF -DATTNKIT_BUILD_EXAMPLES=ON
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" -j "$jobs" --output-on-failure
