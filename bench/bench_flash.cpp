// flash_attention: prefill GFLOP/s against the FMA peak and the naive Eigen baseline, decode GB/s
// of K/V read against the read bandwidth, and the peak memory of a long prefill.
#include "common.hpp"
#include "naive_eigen.hpp"

#include <fstream>
#include <string>

using namespace attnkit;

namespace {

template <class T>
struct prefill_problem {
  index_t B = 1, H = 8, N, D;
  bench::buffer<T> q, k, v;
  bench::buffer<float> out;
  prefill_problem(index_t n, index_t d) : N(n), D(d) {
    const auto sz = std::size_t(B * N * H * D);
    q = bench::random_vector<T>(sz, 1);
    k = bench::random_vector<T>(sz, 2);
    v = bench::random_vector<T>(sz, 3);
    out.assign(sz, 0.f);
  }
  void run(bool causal) {
    attention_params p;
    p.causal = causal;
    flash_attention(bshd(q.data(), B, N, H, D), bshd(k.data(), B, N, H, D), bshd(v.data(), B, N, H, D),
                    bshd(out.data(), B, N, H, D), p);
  }
};

template <class T>
void flash_prefill(benchmark::State& state) {
  const index_t N = state.range(0), D = state.range(1);
  const bool causal = state.range(2) != 0;
  const int threads = int(state.range(3));
  prefill_problem<T> p(N, D);
  bench::run_timed(state, threads, bench::attention_flops(p.B, p.H, N, N, D, causal), 0, [&] { p.run(causal); });
}

void naive_eigen(benchmark::State& state) {
  const index_t N = state.range(0), D = state.range(1);
  const bool causal = state.range(2) != 0;
  const int threads = int(state.range(3));
  prefill_problem<float> p(N, D);
  bench::run_timed(state, threads, bench::attention_flops(p.B, p.H, N, N, D, causal), 0, [&] {
    bench::naive_eigen_attention(p.q.data(), p.k.data(), p.v.data(), p.out.data(), p.B, N, N, p.H, D, causal);
  });
}

// Decode, B1 Hq32 Hkv8 D128, K/V of element TKV: Nq query tokens per step (1: a plain KV-cache
// step; more: speculative decoding) over Nk cached keys.
template <class TKV>
void decode_step(benchmark::State& state, index_t Nq) {
  const index_t Nk = state.range(0), D = 128, Hq = 32, Hkv = 8;
  const int threads = int(state.range(1));
  auto q = bench::random_vector<float>(std::size_t(Nq * Hq * D), 1);
  auto k = bench::random_vector<TKV>(std::size_t(Nk * Hkv * D), 2);
  auto v = bench::random_vector<TKV>(std::size_t(Nk * Hkv * D), 3);
  bench::buffer<float> out(std::size_t(Nq * Hq * D));
  const double bytes = 2.0 * double(Nk * Hkv * D) * sizeof(TKV);
  bench::run_timed(state, threads, bench::attention_flops(1, Hq, Nq, Nk, D, false), bytes, [&] {
    flash_attention(bshd(q.data(), 1, Nq, Hq, D), bshd(k.data(), 1, Nk, Hkv, D), bshd(v.data(), 1, Nk, Hkv, D),
                    bshd(out.data(), 1, Nq, Hq, D));
  });
}

template <class TKV>
void flash_decode(benchmark::State& state) {
  decode_step<TKV>(state, 1);
}

template <class TKV>
void flash_decode_multi(benchmark::State& state) {
  decode_step<TKV>(state, state.range(2));
}

long status_kib(const char* key) {
  std::ifstream f("/proc/self/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind(key, 0) == 0) return std::stol(line.substr(std::string(key).size()));
  return -1;
}

// Peak resident memory of one causal prefill at N = 65536, D = 128, H = 8 (float), relative to the
// bytes of q, k, v and out. The kernel's peak (VmHWM, reset through /proc/self/clear_refs) minus
// the resident size before the inputs were allocated.
void flash_peak_memory(benchmark::State& state) {
  const index_t N = state.range(0), D = 128, H = 8;
  const int threads = int(state.range(1));
  bench::set_threads(threads);
  for (auto _ : state) {
    { std::ofstream("/proc/self/clear_refs") << "5"; }
    const long before = status_kib("VmRSS:");
    prefill_problem<float> p(N, D);
    p.run(true);
    const long peak = status_kib("VmHWM:");
    const double io_bytes = 4.0 * double(N * H * D) * sizeof(float);
    state.counters["peak_MiB"] = double(peak - before) / 1024.0;
    state.counters["io_MiB"] = io_bytes / (1 << 20);
    state.counters["peak_over_io"] = double(peak - before) * 1024.0 / io_bytes;
  }
  state.counters["threads"] = threads;
}

}  // namespace

#define PREFILL_ARGS(max_n)                                                                    \
  ArgNames({"N", "D", "causal", "threads"})                                                    \
      ->ArgsProduct({benchmark::CreateRange(512, max_n, 2), {64, 128}, {0, 1}, {1, 2}})        \
      ->UseManualTime()                                                                        \
      ->Unit(benchmark::kMillisecond)
BENCHMARK(flash_prefill<float>)->Name("flash_f32")->PREFILL_ARGS(8192);
BENCHMARK(flash_prefill<bf16>)->Name("flash_bf16")->PREFILL_ARGS(8192);
BENCHMARK(naive_eigen)->PREFILL_ARGS(4096);
BENCHMARK(flash_decode<float>)->Name("flash_decode_kv_f32")->ArgNames({"Nk", "threads"})
    ->ArgsProduct({{4096, 32768, 131072}, {1, 2}})->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(flash_decode<f16>)->Name("flash_decode_kv_f16")->ArgNames({"Nk", "threads"})
    ->ArgsProduct({{4096, 32768, 131072}, {1, 2}})->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(flash_decode_multi<f16>)->Name("flash_decode_multi_kv_f16")->ArgNames({"Nk", "threads", "Nq"})
    ->ArgsProduct({{32768}, {2}, {4, 16}})->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK(flash_peak_memory)->ArgNames({"N", "threads"})->Args({65536, 2})->Iterations(1)->Unit(benchmark::kSecond);
