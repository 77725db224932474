// The machine's own limits at 1 and 2 threads: single-precision FMA peak and memory read bandwidth.
// Every other bench divides by these same measurements (taken in its own process).
#include "common.hpp"

using namespace attnkit;

static void machine_fma_peak(benchmark::State& state) {
  const int threads = int(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(bench::fma_peak_gflops(threads));
  state.counters["GFLOPs"] = bench::fma_peak_gflops(threads);
  state.counters["threads"] = threads;
}
BENCHMARK(machine_fma_peak)->ArgName("threads")->Arg(1)->Arg(2)->Iterations(1);

static void machine_read_bandwidth(benchmark::State& state) {
  const int threads = int(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(bench::read_bandwidth_gbs(threads));
  state.counters["GBs"] = bench::read_bandwidth_gbs(threads);
  state.counters["threads"] = threads;
}
BENCHMARK(machine_read_bandwidth)->ArgName("threads")->Arg(1)->Arg(2)->Iterations(1);
