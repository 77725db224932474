// reference_attention (the double-precision oracle) against the naive Eigen baseline. The oracle is
// meant to be exact, not fast; this bench keeps its cost visible.
#include "common.hpp"
#include "naive_eigen.hpp"

using namespace attnkit;

namespace {
struct problem {
  index_t B = 1, N, H = 4, D;
  bench::buffer<float> q, k, v, out;
  problem(index_t n, index_t d) : N(n), D(d) {
    const auto sz = std::size_t(B * N * H * D);
    q = bench::random_vector<float>(sz, 1);
    k = bench::random_vector<float>(sz, 2);
    v = bench::random_vector<float>(sz, 3);
    out.assign(sz, 0.f);
  }
};
}  // namespace

static void reference(benchmark::State& state) {
  problem p(state.range(0), state.range(1));
  const int threads = int(state.range(2));
  bench::run_timed(state, threads, bench::attention_flops(p.B, p.H, p.N, p.N, p.D, false), 0, [&] {
    reference_attention(bshd(p.q.data(), p.B, p.N, p.H, p.D), bshd(p.k.data(), p.B, p.N, p.H, p.D),
                        bshd(p.v.data(), p.B, p.N, p.H, p.D), bshd(p.out.data(), p.B, p.N, p.H, p.D));
  });
}

static void naive_eigen(benchmark::State& state) {
  problem p(state.range(0), state.range(1));
  const int threads = int(state.range(2));
  bench::run_timed(state, threads, bench::attention_flops(p.B, p.H, p.N, p.N, p.D, false), 0, [&] {
    bench::naive_eigen_attention(p.q.data(), p.k.data(), p.v.data(), p.out.data(), p.B, p.N, p.N, p.H, p.D, false);
  });
}

#define ATTNKIT_REFERENCE_ARGS \
  ArgNames({"N", "D", "threads"})->ArgsProduct({{256, 512, 1024}, {64}, {1, 2}})->UseManualTime()->Unit(benchmark::kMillisecond)
BENCHMARK(reference)->ATTNKIT_REFERENCE_ARGS;
BENCHMARK(naive_eigen)->ATTNKIT_REFERENCE_ARGS;
