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
// case's own bias plus the mask's 0 / -inf bias (run_against_reference builds the reference's
// params from c.bias_data; the operator gets the case's original bias back).
template <class T = float, class O = float>
attn_result run_masked(const attn_case& c0, const block_mask& mask) {
  attn_case c = c0;
  const std::array<index_t, 4> ue = c0.bias_extents;
  const auto user_bias = [&](index_t b, index_t h, index_t i, index_t j) -> float {
    if (c0.bias_data.empty()) return 0.f;
    const index_t bb = ue[0] == 1 ? 0 : b, hh = ue[1] == 1 ? 0 : h, ii = ue[2] == 1 ? 0 : i, jj = ue[3] == 1 ? 0 : j;
    return c0.bias_data[std::size_t(((bb * ue[1] + hh) * ue[2] + ii) * ue[3] + jj)];
  };
  c.bias_extents = {c.B, c.Hq, c.Nq, c.Nk};
  c.bias_data.assign(std::size_t(c.B * c.Hq * c.Nq * c.Nk), 0.f);
  for (index_t b = 0; b < c.B; ++b)
    for (index_t h = 0; h < c.Hq; ++h)
      for (index_t i = 0; i < c.Nq; ++i)
        for (index_t j = 0; j < c.Nk; ++j)
          c.bias_data[std::size_t(((b * c.Hq + h) * c.Nq + i) * c.Nk + j)] =
              mask.is_active(b, h, i / mask.block_q(), j / mask.block_k()) ? user_bias(b, h, i, j) : -std::numeric_limits<float>::infinity();
  tensor_view<const float, 4> own{};
  if (!c0.bias_data.empty())
    own = tensor_view<const float, 4>(c0.bias_data.data(), ue, {ue[1] * ue[2] * ue[3], ue[2] * ue[3], ue[3], 1});
  return run_against_reference<T, O>(c, [&](auto q, auto k, auto v, auto out, attention_params p, auto lse) {
    p.bias = own;
    block_sparse_attention(q, k, v, out, mask, p, lse);
  });
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
