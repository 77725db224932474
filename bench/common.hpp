// Shared by every bench: thread control, the machine's FMA peak and read bandwidth measured in the
// same process (so ratios come from one run), FLOP/byte counters, random inputs.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <new>
#include <random>
#include <vector>

#include <attnkit/attnkit.hpp>

namespace attnkit::bench {

// Bench tensors start on a cache line, as callers' tensors usually do (PyTorch's, ggml's and most
// allocators' large blocks are aligned to 64 bytes or more). std::vector's large blocks start 16
// bytes into a page, so with AVX-512 every vector load of a row would straddle two lines.
template <class T>
struct line_allocator {
  using value_type = T;
  line_allocator() = default;
  template <class U>
  line_allocator(const line_allocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  friend bool operator==(const line_allocator&, const line_allocator&) { return true; }
};
template <class T>
using buffer = std::vector<T, line_allocator<T>>;

inline void set_threads(int threads) {
#if defined(_OPENMP)
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

namespace detail {

template <class F>
double best_seconds(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// 12 independent FMA chains per thread hide the FMA latency on every current x86 core.
inline float fma_chains(std::int64_t iters, float seed) {
  constexpr int chains = 12;
  simd::vec acc[chains];
  for (int c = 0; c < chains; ++c) acc[c] = simd::vec(seed + float(c));
  const simd::vec a(0.999999f), b(1e-7f);
  for (std::int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < chains; ++c) acc[c] = simd::fma(acc[c], a, b);
  simd::vec s(0.f);
  for (int c = 0; c < chains; ++c) s += acc[c];
  return simd::hsum(s);
}

}  // namespace detail

// Single-precision FMA peak in GFLOP/s with `threads` threads, measured once per thread count.
inline double fma_peak_gflops(int threads) {
  static std::map<int, double> cache;
  if (auto it = cache.find(threads); it != cache.end()) return it->second;
  const std::int64_t iters = 20'000'000;
  volatile float sink = 0;
  const double sec = detail::best_seconds(5, [&] {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
      const float r = detail::fma_chains(iters, 1.f);
      sink = sink + r;
    }
  });
  const double flops = 2.0 * 12 * simd::width * double(iters) * threads;
  return cache[threads] = flops / sec / 1e9;
}

// Read bandwidth in GB/s over a 512 MiB buffer with `threads` threads, measured once per count.
inline double read_bandwidth_gbs(int threads) {
  static std::map<int, double> cache;
  if (auto it = cache.find(threads); it != cache.end()) return it->second;
  const std::size_t n = (std::size_t(512) << 20) / sizeof(float);
  buffer<float> buf(n, 1.f);
  volatile float sink = 0;
  const double sec = detail::best_seconds(5, [&] {
    float total = 0;
#if defined(_OPENMP)
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
#endif
    for (std::int64_t blk = 0; blk < std::int64_t(n / 4096); ++blk) {
      simd::vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
      const float* p = buf.data() + blk * 4096;
      for (index_t i = 0; i < 4096; i += 4 * simd::width) {
        a0 += simd::load(p + i);
        a1 += simd::load(p + i + simd::width);
        a2 += simd::load(p + i + 2 * simd::width);
        a3 += simd::load(p + i + 3 * simd::width);
      }
      total += simd::hsum(a0 + a1 + a2 + a3);
    }
    sink = sink + total;
  });
  return cache[threads] = double(n * sizeof(float)) / sec / 1e9;
}

// Times the benchmark loop itself (wall clock, all threads) and sets the standard counters:
// GFLOP/s and pct_peak (of the FMA peak at this thread count) when flops > 0, GB/s and pct_bw
// (of the read bandwidth) when bytes > 0.
template <class F>
void run_timed(benchmark::State& state, int threads, double flops, double bytes, F&& body) {
  set_threads(threads);
  const double peak = flops > 0 ? fma_peak_gflops(threads) : 0;
  const double bw = bytes > 0 ? read_bandwidth_gbs(threads) : 0;
  body();  // warm-up: page faults, caches
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    body();
    const auto t1 = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(t1 - t0).count();
    seconds += s;
    state.SetIterationTime(s);
  }
  const double iters = double(state.iterations());
  if (flops > 0) {
    const double gflops = flops * iters / seconds / 1e9;
    state.counters["GFLOPs"] = gflops;
    state.counters["pct_peak"] = 100.0 * gflops / peak;
  }
  if (bytes > 0) {
    const double gbs = bytes * iters / seconds / 1e9;
    state.counters["GBs"] = gbs;
    state.counters["pct_bw"] = 100.0 * gbs / bw;
  }
  state.counters["threads"] = threads;
}

// Softmax-attention FLOPs as DESIGN.md counts them: 4 * Nq * Nk * D per head, halved for causal
// self-attention.
inline double attention_flops(index_t B, index_t H, index_t Nq, index_t Nk, index_t D, bool causal) {
  const double f = 4.0 * double(B) * double(H) * double(Nq) * double(Nk) * double(D);
  return causal && Nq == Nk ? f / 2 : f;
}

template <class T>
buffer<T> random_vector(std::size_t n, std::uint64_t seed, float amplitude = 1.f) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<float> u(-amplitude, amplitude);
  buffer<T> r(n);
  for (auto& x : r) x = T(u(g));
  return r;
}

}  // namespace attnkit::bench
