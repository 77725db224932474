// sparse_attention: GFLOP/s over the computed (allowed) scores, 4 * pairs * D, for sliding windows
// and a BigBird pattern, against dense flash_attention (non-causal) on the same shapes in the same
// run: vs_dense = sparse GFLOP/s / dense GFLOP/s (throughput per computed score). For each N the
// dense row runs right before the sparse rows of that N; at N = 65536, where dense would take
// minutes, vs_dense uses the dense figure of the largest N measured before it (dense_N says which).
// GFLOPs_cpu / vs_dense_cpu: the same from process CPU time (see run_measured), for shared machines.
#include "common.hpp"

#include <chrono>
#include <ctime>
#include <map>
#include <string>
#include <utility>

using namespace attnkit;

namespace {

constexpr index_t B = 1, H = 8, D = 128;

struct problem {
  index_t N;
  bench::buffer<float> q, k, v, out;
  explicit problem(index_t n) : N(n) {
    const auto sz = std::size_t(B * N * H * D);
    q = bench::random_vector<float>(sz, 1);
    k = bench::random_vector<float>(sz, 2);
    v = bench::random_vector<float>(sz, 3);
    out.assign(sz, 0.f);
  }
  tensor_view<const float, 4> view(const bench::buffer<float>& x) const { return bshd(x.data(), B, N, H, D); }
  tensor_view<float, 4> out_view() { return bshd(out.data(), B, N, H, D); }
};

double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

// bench::run_timed (wall clock: GFLOPs) plus GFLOPs_cpu, the same FLOPs over the process CPU time
// per call divided by the thread count: on a shared machine whose cores are time-sliced with other
// jobs it estimates the throughput of uncontended cores (idle OpenMP spinning counts as busy, so
// it errs low).
template <class F>
void run_measured(benchmark::State& state, int threads, double flops, F&& body) {
  double cpu = 0;
  int calls = 0;
  bench::run_timed(state, threads, flops, 0, [&] {
    const double t0 = process_cpu_seconds();
    body();
    cpu += process_cpu_seconds() - t0;
    ++calls;
  });
  state.counters["GFLOPs_cpu"] = flops / (cpu / calls / threads) / 1e9;
}

// Dense flash GFLOP/s (wall, cpu) by (threads, N), filled by flash_dense rows (best of the
// repetitions).
std::map<std::pair<int, index_t>, std::pair<double, double>>& dense_gflops() {
  static std::map<std::pair<int, index_t>, std::pair<double, double>> m;
  return m;
}

void flash_dense(benchmark::State& state) {
  const index_t N = state.range(0);
  const int threads = int(state.range(1));
  problem p(N);
  run_measured(state, threads, bench::attention_flops(B, H, N, N, D, false), [&] {
    flash_attention(p.view(p.q), p.view(p.k), p.view(p.v), p.out_view());
  });
  auto& best = dense_gflops()[{threads, N}];
  best.first = std::max(best.first, state.counters["GFLOPs"].value);
  best.second = std::max(best.second, state.counters["GFLOPs_cpu"].value);
}

void set_vs_dense(benchmark::State& state, int threads, index_t N) {
  const auto& m = dense_gflops();
  auto it = m.upper_bound({threads, N});  // the largest N' <= N measured at this thread count
  if (it == m.begin()) return;
  --it;
  if (it->first.first != threads) return;
  state.counters["vs_dense"] = state.counters["GFLOPs"].value / it->second.first;
  state.counters["vs_dense_cpu"] = state.counters["GFLOPs_cpu"].value / it->second.second;
  state.counters["dense_N"] = double(it->first.second);
}

void run_pattern(benchmark::State& state, const sparse_pattern& pat, index_t N, int threads, double pairs) {
  problem p(N);
  run_measured(state, threads, 4.0 * pairs * double(D), [&] {
    sparse_attention(p.view(p.q), p.view(p.k), p.view(p.v), p.out_view(), pat);
  });
  state.counters["pairs_per_row"] = pairs / double(B * H * N);
  set_vs_dense(state, threads, N);
}

// Sliding window of W keys per query: query i sees keys i - W + 1 .. i.
void sparse_window(benchmark::State& state) {
  const index_t N = state.range(0), W = state.range(1);
  const int threads = int(state.range(2));
  sparse_pattern pat;
  pat.window_left = W - 1;
  const double per_head = double(W) * double(W + 1) / 2 + double(N - W) * double(W);
  run_pattern(state, pat, N, threads, per_head * double(B * H));
}

// BigBird: block 64; window of 3 blocks (each query sees 96 keys on either side, 193 in all); the
// first and last block global; 3 random blocks per query block and head.
void sparse_bigbird(benchmark::State& state) {
  const index_t N = state.range(0), bs = 64;
  const int threads = int(state.range(1));
  sparse_pattern pat;
  pat.window_left = pat.window_right = 96;
  for (index_t g = 0; g < bs; ++g) {
    pat.global_tokens.push_back(g);
    pat.global_tokens.push_back(N - bs + g);
  }
  pat.block_size = bs;
  pat.random_blocks = 3;
  pat.seed = 1;
  double pairs = 0;
  for (index_t h = 0; h < H; ++h) pairs += double(to_csr(pat, N, N, h).col_idx.size()) * double(B);
  run_pattern(state, pat, N, threads, pairs);
}

// time(N = 65536) / time(N = 8192) for a fixed window of W keys, the two sizes timed alternately
// in every iteration so that machine drift affects both alike (target: <= 9, linear in N).
void sparse_window_scaling(benchmark::State& state) {
  const index_t W = state.range(0);
  const int threads = int(state.range(1));
  bench::set_threads(threads);
  problem small(8192), large(65536);
  sparse_pattern pat;
  pat.window_left = W - 1;
  auto run = [&](problem& p) { sparse_attention(p.view(p.q), p.view(p.k), p.view(p.v), p.out_view(), pat); };
  run(small);  // warm-up
  run(large);
  double t_small = 0, t_large = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    run(small);
    const auto t1 = std::chrono::steady_clock::now();
    run(large);
    const auto t2 = std::chrono::steady_clock::now();
    t_small += std::chrono::duration<double>(t1 - t0).count();
    t_large += std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(std::chrono::duration<double>(t2 - t0).count());
  }
  state.counters["t64k_over_t8k"] = t_large / t_small;
  state.counters["threads"] = threads;
}

// Registered per N so that each dense row runs right before the sparse rows it is compared with.
[[maybe_unused]] const bool registered = [] {
  for (index_t N : {4096, 8192, 16384, 65536})
    for (int threads : {1, 2}) {
      if (N <= 16384)
        benchmark::RegisterBenchmark("flash_dense", flash_dense)
            ->ArgNames({"N", "threads"})->Args({N, threads})->UseManualTime()->Unit(benchmark::kMillisecond);
      for (index_t W : {256, 512})
        benchmark::RegisterBenchmark("sparse_window", sparse_window)
            ->ArgNames({"N", "W", "threads"})->Args({N, W, threads})->UseManualTime()->Unit(benchmark::kMillisecond);
      if (N == 4096 || N == 16384)
        benchmark::RegisterBenchmark("sparse_bigbird", sparse_bigbird)
            ->ArgNames({"N", "threads"})->Args({N, threads})->UseManualTime()->Unit(benchmark::kMillisecond);
    }
  for (int threads : {1, 2})
    for (index_t W : {256, 512})
      benchmark::RegisterBenchmark("sparse_window_scaling", sparse_window_scaling)
          ->ArgNames({"W", "threads"})->Args({W, threads})->UseManualTime()->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace
