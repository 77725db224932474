// Block-sparse test cases: random block grids and masks, and block_sparse_attention run against
// reference_attention with the mask's 0 / -inf bias added. Shared by test_block_sparse and
// test_xattention.
#pragma once

#include "flash_cases.hpp"

namespace attnkit::test {

// A random grid (B, H, nqb, nkb) with tiles active with probability `density`; every
// `empty_every`-th query block row is left empty (0: none).
inline std::vector<std::uint8_t> random_grid(index_t B, index_t H, index_t nqb, index_t nkb, double density,
                                      std::uint64_t seed, index_t empty_every = 0) {
  auto g = rng(seed);
  std::bernoulli_distribution on(density);
  std::vector<std::uint8_t> grid(std::size_t(B * H * nqb * nkb));
  for (index_t r = 0; r < B * H * nqb; ++r)
    for (index_t kb = 0; kb < nkb; ++kb)
      grid[std::size_t(r * nkb + kb)] = (empty_every > 0 && r % empty_every == empty_every - 1) ? 0 : on(g);
  return grid;
}

inline tensor_view<const std::uint8_t, 4> grid_view(const std::vector<std::uint8_t>& g, index_t B, index_t H, index_t nqb,
                                             index_t nkb) {
  return tensor_view<const std::uint8_t, 4>(g.data(), {B, H, nqb, nkb}, {H * nqb * nkb, nqb * nkb, nkb, 1});
}

inline block_mask random_mask(const attn_case& c, index_t bq, index_t bk, double density, std::uint64_t seed,
                       index_t empty_every = 0) {
  const index_t nqb = (c.Nq + bq - 1) / bq, nkb = (c.Nk + bk - 1) / bk;
  const auto grid = random_grid(c.B, c.Hq, nqb, nkb, density, seed, empty_every);
  return block_mask::from_dense(bq, bk, grid_view(grid, c.B, c.Hq, nqb, nkb));
}

// Runs block_sparse_attention with `mask` and compares with reference_attention whose bias is the
// case's own bias plus the mask's 0 / -inf bias.
template <class T = float, class O = float>
attn_result run_masked(const attn_case& c, const block_mask& mask) {
  return run_against_reference_masked<T, O>(
      c, [&](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) { block_sparse_attention(q, k, v, out, mask, p, lse); },
      [&](index_t b, index_t h, index_t i, index_t j) { return mask.is_active(b, h, i / mask.block_q(), j / mask.block_k()); });
}

// Asserts block_sparse_attention(mask) matches the reference within tol (relative to max |ref|; lse absolute).
template <class T = float, class O = float>
void check_masked(const attn_case& c, const block_mask& mask, double tol = 2e-5) {
  INFO(describe(c) << " dtype=" << element_name<T>() << " blocks=" << mask.block_q() << "x" << mask.block_k()
                   << " density=" << mask.density());
  const auto r = run_masked<T, O>(c, mask);
  CHECK_FALSE(r.out.mismatched_nonfinite);
  CHECK(r.out.rel() <= tol);
  CHECK(r.lse_err <= tol);
}

}  // namespace attnkit::test
