// linear_attention: the causal chunked form and the non-causal form, GFLOP/s and % of the FMA peak
// measured in the same process, plus FAVOR+ and one recurrent decode step.
//
// FLOP count (the GFLOPs / pct_peak counters): 4 * B * H * N * F * Dv, the two GEMM-shaped products
// every O(N F Dv) linear-attention algorithm performs (phi(K)^T V and phi(Q) S, 2 FLOPs per
// multiply-add). The causal form's extra intra-chunk products (phi(Q_c) phi(K_c)^T and P_c V_c: about
// C / 2 * (F + Dv) multiply-adds per position for chunk C = 32, more with the padding to whole vectors),
// the feature maps, FAVOR+'s projections (4 * N * m * d) and the normalizers are real work that is not
// counted, so pct_peak understates the arithmetic rate.
// Shapes: B = 1, H = 4 heads (linear_causal_gqa: 16 query heads), F = Dv = D (elu_plus_one), fp32 bshd.
#include "common.hpp"

#include <attnkit/ops/linear.hpp>

using namespace attnkit;

namespace {

struct problem {
  index_t B = 1, N, H, Hkv, D;
  bench::buffer<float> q, k, v, out;
  problem(index_t n, index_t d, index_t heads = 4, index_t kv_heads = 4) : N(n), H(heads), Hkv(kv_heads), D(d) {
    const auto sz = std::size_t(B * N * H * D), kv = std::size_t(B * N * Hkv * D);
    q = bench::random_vector<float>(sz, 1);
    k = bench::random_vector<float>(kv, 2);
    v = bench::random_vector<float>(kv, 3);
    out.assign(sz, 0.f);
  }
  void run(const linear_params& p) {
    linear_attention(bshd(q.data(), B, N, H, D), bshd(k.data(), B, N, Hkv, D), bshd(v.data(), B, N, Hkv, D),
                     bshd(out.data(), B, N, H, D), p);
  }
};

double linear_flops(index_t B, index_t H, index_t N, index_t F, index_t Dv) {
  return 4.0 * double(B) * double(H) * double(N) * double(F) * double(Dv);
}

void run_linear_bench(benchmark::State& state, bool causal) {
  problem pr(state.range(0), state.range(1));
  const int threads = int(state.range(2));
  linear_params p;
  p.causal = causal;
  bench::run_timed(state, threads, linear_flops(pr.B, pr.H, pr.N, pr.D, pr.D), 0, [&] { pr.run(p); });
}

}  // namespace

static void linear_causal(benchmark::State& state) { run_linear_bench(state, true); }
static void linear_noncausal(benchmark::State& state) { run_linear_bench(state, false); }

// FAVOR+ with m = 256 random features (counted F = m).
static void linear_favor_causal(benchmark::State& state) {
  problem pr(state.range(0), state.range(1));
  const int threads = int(state.range(2));
  const favor_projection proj = make_favor_projection(256, pr.D, 1);
  linear_params p;
  p.phi = feature_map::favor_positive;
  p.causal = true;
  p.projection = proj;
  bench::run_timed(state, threads, linear_flops(pr.B, pr.H, pr.N, 256, pr.D), 0, [&] { pr.run(p); });
}

// Grouped heads: 16 query heads over Hkv kv heads (16: plain multi-head, the baseline of the same run;
// 4 and 1: groups whose query heads share one key side, S = phi(K)^T V). FLOPs are counted per query
// head as above, so the shared key-side work shows as a higher rate.
static void run_gqa_bench(benchmark::State& state, bool causal) {
  problem pr(state.range(0), state.range(1), 16, state.range(2));
  const int threads = int(state.range(3));
  linear_params p;
  p.causal = causal;
  bench::run_timed(state, threads, linear_flops(pr.B, pr.H, pr.N, pr.D, pr.D), 0, [&] { pr.run(p); });
}
static void linear_causal_gqa(benchmark::State& state) { run_gqa_bench(state, true); }
static void linear_noncausal_gqa(benchmark::State& state) { run_gqa_bench(state, false); }

namespace {

// One recurrent decode step for B sequences of Hq query heads over Hkv kv heads, with Hs states per
// sequence (Hq: one per query head, Hkv: one per kv head), each read and written once per step:
// bytes = 2 * B * Hs * F * Dv * 4, the state traffic of that layout.
void run_step_bench(benchmark::State& state, index_t B, index_t Hq, index_t Hkv, index_t Hs, index_t D, int threads) {
  auto q = bench::random_vector<float>(std::size_t(B * Hq * D), 1),
       k = bench::random_vector<float>(std::size_t(B * Hkv * D), 2), v = bench::random_vector<float>(k.size(), 3);
  bench::buffer<float> out(q.size());
  linear_params p;
  p.causal = true;
  linear_attention_state st(B, Hs, D, D);
  const double flops = linear_flops(B, Hq, 1, D, D), bytes = 2.0 * double(B * Hs * D * D) * sizeof(float);
  bench::run_timed(state, threads, flops, bytes, [&] {
    linear_attention_step(st, bshd(q.data(), B, 1, Hq, D), bshd(k.data(), B, 1, Hkv, D), bshd(v.data(), B, 1, Hkv, D),
                          bshd(out.data(), B, 1, Hq, D), p);
  });
}

}  // namespace

// 32 sequences x 8 heads: states of 4 MiB (D = 64) or 16 MiB (D = 128).
static void linear_step(benchmark::State& state) {
  run_step_bench(state, 32, 8, 8, 8, state.range(0), int(state.range(1)));
}

// Grouped heads: B sequences (1: single-stream decoding, 32: a serving batch) x 32 query heads over
// 8 kv heads, with a state per query head (state_heads 32: 16 MiB at D = 64, 64 MiB at D = 128 for B
// = 32) or one per kv head (8: a quarter, each read and written once for its 4 query heads); compare
// the times.
static void linear_step_gqa(benchmark::State& state) {
  run_step_bench(state, state.range(0), 32, 8, state.range(2), state.range(1), int(state.range(3)));
}

#define ATTNKIT_LINEAR_ARGS                                                                                  \
  ArgNames({"N", "D", "threads"})                                                                            \
      ->ArgsProduct({{1024, 4096, 8192, 16384, 65536}, {64, 128}, {1, 2}})                                   \
      ->UseManualTime()                                                                                      \
      ->Unit(benchmark::kMillisecond)
BENCHMARK(linear_causal)->ATTNKIT_LINEAR_ARGS;
BENCHMARK(linear_noncausal)->ATTNKIT_LINEAR_ARGS;
BENCHMARK(linear_favor_causal)
    ->ArgNames({"N", "D", "threads"})
    ->ArgsProduct({{8192}, {64}, {1, 2}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
#define ATTNKIT_LINEAR_GQA_ARGS                                                                              \
  ArgNames({"N", "D", "Hkv", "threads"})                                                                     \
      ->ArgsProduct({{8192}, {64, 128}, {16, 4, 1}, {1, 2}})                                                 \
      ->UseManualTime()                                                                                      \
      ->Unit(benchmark::kMillisecond)
BENCHMARK(linear_causal_gqa)->ATTNKIT_LINEAR_GQA_ARGS;
BENCHMARK(linear_noncausal_gqa)->ATTNKIT_LINEAR_GQA_ARGS;
BENCHMARK(linear_step)->ArgNames({"D", "threads"})->ArgsProduct({{64, 128}, {1, 2}})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(linear_step_gqa)
    ->ArgNames({"B", "D", "state_heads", "threads"})
    ->ArgsProduct({{1, 32}, {64, 128}, {32, 8}, {1, 2}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
