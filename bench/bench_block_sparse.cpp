// block_sparse_attention over random block masks of fixed density (128 x 128 blocks, exactly
// round(density * k_blocks) active key blocks per query block row), dense flash_attention on the
// same shapes in the same run, and xattention_select (block 128, stride 8). B = 1, D = 128,
// non-causal, float, BSHD. GFLOP/s count 4 * D per computed score (the active tiles' scores) for
// the attention benches and 2 * Nq * Nk * D / stride per head (the scoring GEMM) for the selection.
// Compare times, not GFLOP/s, for the speed-up: block_sparse time / flash_dense time at the same N
// and thread count, and xattention_select time / flash_dense time.
#include "common.hpp"

#include <numeric>

using namespace attnkit;

namespace {

constexpr index_t D = 128, block = 128, stride = 8;

// Heads per N: 8, except 32k, which uses 4 so that dense flash stays timeable in a shared run.
index_t heads_for(index_t N) { return N >= 32768 ? 4 : 8; }

struct problem {
  index_t N, H;
  bench::buffer<float> q, k, v, out;
  problem(index_t n, index_t h) : N(n), H(h) {
    const auto sz = std::size_t(N * H * D);
    q = bench::random_vector<float>(sz, 1);
    k = bench::random_vector<float>(sz, 2);
    v = bench::random_vector<float>(sz, 3);
    out.assign(sz, 0.f);
  }
  tensor_view<const float, 4> view(const bench::buffer<float>& x) const { return bshd(x.data(), 1, N, H, D); }
};

// Random mask with exactly max(1, round(density * nkb)) key blocks per (head, query block).
block_mask random_mask(index_t N, index_t H, double density, std::uint64_t seed) {
  const index_t nb = (N + block - 1) / block;
  const index_t per_row = std::max<index_t>(1, index_t(std::llround(density * double(nb))));
  std::vector<std::uint8_t> grid(std::size_t(H * nb * nb), 0);
  std::mt19937_64 g(seed);
  std::vector<index_t> idx(static_cast<std::size_t>(nb));
  for (index_t r = 0; r < H * nb; ++r) {
    std::iota(idx.begin(), idx.end(), index_t(0));
    std::shuffle(idx.begin(), idx.end(), g);
    for (index_t i = 0; i < per_row; ++i) grid[std::size_t(r * nb + idx[std::size_t(i)])] = 1;
  }
  return block_mask::from_dense(block, block,
                                tensor_view<const std::uint8_t, 4>(grid.data(), {1, H, nb, nb}, {H * nb * nb, nb * nb, nb, 1}));
}

// Scores computed by block_sparse_attention: rows x keys of every active tile.
double computed_scores(const block_mask& m, index_t N) {
  double n = 0;
  for (index_t h = 0; h < m.heads(); ++h)
    for (index_t qb = 0; qb < m.q_blocks(); ++qb) {
      const index_t rows = std::min(N, (qb + 1) * block) - qb * block;
      for (const auto& r : m.active(0, h, qb)) n += double(rows) * double(std::min(N, r.end * block) - r.begin * block);
    }
  return n;
}

void block_sparse(benchmark::State& state) {
  const index_t N = state.range(0);
  const double density = double(state.range(1)) / 100.0;
  const int threads = int(state.range(2));
  problem p(N, heads_for(N));
  const auto mask = random_mask(N, p.H, density, 7);
  state.counters["density"] = mask.density();
  bench::run_timed(state, threads, 4.0 * double(D) * computed_scores(mask, N), 0, [&] {
    block_sparse_attention(p.view(p.q), p.view(p.k), p.view(p.v), bshd(p.out.data(), 1, N, p.H, D), mask);
  });
}

void flash_dense(benchmark::State& state) {
  const index_t N = state.range(0);
  const int threads = int(state.range(1));
  problem p(N, heads_for(N));
  bench::run_timed(state, threads, bench::attention_flops(1, p.H, N, N, D, false), 0, [&] {
    flash_attention(p.view(p.q), p.view(p.k), p.view(p.v), bshd(p.out.data(), 1, N, p.H, D));
  });
}

void xattention(benchmark::State& state) {
  const index_t N = state.range(0);
  const int threads = int(state.range(1));
  problem p(N, heads_for(N));
  xattention_params xp;
  xp.block = block;
  xp.stride = stride;
  xp.threshold = 0.9f;
  double density = 0;
  bench::run_timed(state, threads, 2.0 * double(p.H) * double(N) * double(N) * double(D) / double(stride), 0, [&] {
    density = xattention_select(p.view(p.q), p.view(p.k), xp).density();
  });
  state.counters["density"] = density;
}

// Registered N by N (dense flash, then the densities, then the selection) so each comparison is
// timed close together on the shared machine; then the 1-thread figures at 8k.
const int registered = [] {
  auto add = [](index_t n, int threads) {
    benchmark::RegisterBenchmark("flash_dense", flash_dense)->ArgNames({"N", "threads"})->Args({n, threads})
        ->UseManualTime()->Unit(benchmark::kMillisecond);
    for (index_t d : {5, 10, 25, 50, 100})
      benchmark::RegisterBenchmark("block_sparse", block_sparse)->ArgNames({"N", "density", "threads"})
          ->Args({n, d, threads})->UseManualTime()->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("xattention_select", xattention)->ArgNames({"N", "threads"})->Args({n, threads})
        ->UseManualTime()->Unit(benchmark::kMillisecond);
  };
  for (index_t n : {8192, 16384, 32768}) add(n, 2);
  add(8192, 1);
  return 0;
}();

}  // namespace
