// attnkit::cuda::block_sparse_attention's test cases, run through the GPU backend
// (cuda_backend.cuh) and the CPU emulation of the flash kernel (test_cuda_emulated_block_sparse.cpp).
// Each case runs reference_attention with the problem's own bias plus the mask as a 0 / -inf bias
// (the operator's definition, ops/block_sparse.hpp) and compares out and lse as check_flash does.
//
// A backend provides, besides flash() (flash_cases.hpp),
//   template <class T, class TO> void block_sparse(const problem<T>&, const block_mask&, tensor4<TO>& out,
//                                                  tensor3<TO>* lse);
#pragma once

#include <limits>
#include <vector>

#include "flash_cases.hpp"

namespace attnkit::test::cuda_cases {

// Tiles of (B or 1, H or 1) x ceil(Nq / bq) x ceil(Nk / bk) active with probability `density`;
// every `empty_every`-th query-block row (0: none) left empty.
inline block_mask random_block_mask(index_t B, index_t H, index_t Nq, index_t Nk, index_t bq, index_t bk,
                                    double density, std::uint64_t seed, index_t empty_every = 0) {
  const index_t nqb = (Nq + bq - 1) / bq, nkb = (Nk + bk - 1) / bk;
  auto g = rng(seed);
  std::bernoulli_distribution on(density);
  std::vector<std::uint8_t> grid(static_cast<std::size_t>(std::max<index_t>(B * H * nqb * nkb, 1)));
  for (index_t r = 0; r < B * H * nqb; ++r)
    for (index_t kb = 0; kb < nkb; ++kb)
      grid[static_cast<std::size_t>(r * nkb + kb)] =
          (empty_every > 0 && r % empty_every == empty_every - 1) ? 0 : std::uint8_t(on(g));
  return block_mask::from_dense(
      bq, bk, tensor_view<const std::uint8_t, 4>(grid.data(), {B, H, nqb, nkb}, {H * nqb * nkb, nqb * nkb, nkb, 1}));
}

template <class T, class Backend>
void check_block_sparse(Backend& backend, const spec& s, const block_mask& mask) {
  using TO = accum_t<T>;
  INFO(element_name<T>() << " " << s.name() << " mask " << mask.block_q() << "x" << mask.block_k() << " ("
                         << mask.batch() << ", " << mask.heads() << ") density " << mask.density());
  const problem<T> p = make_problem<T>(s);
  // The definition: the problem's bias plus 0 on active tiles and -inf elsewhere.
  const index_t B = s.B, H = s.Hq, Nq = s.Nq, Nk = s.Nk;
  std::vector<float> bias(static_cast<std::size_t>(std::max<index_t>(B * H * Nq * Nk, 1)));
  const auto own = attnkit::detail::broadcast_to(p.params.bias, {B, H, Nq, Nk});
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Nq; ++i)
        for (index_t j = 0; j < Nk; ++j) {
          const bool on = mask.is_active(b, h, i / mask.block_q(), j / mask.block_k());
          bias[static_cast<std::size_t>(((b * H + h) * Nq + i) * Nk + j)] =
              (own.empty() ? 0.f : own(b, h, i, j)) + (on ? 0.f : -std::numeric_limits<float>::infinity());
        }
  attention_params rp = p.params;
  rp.bias = tensor_view<const float, 4>(bias.data(), {B, H, Nq, Nk}, {H * Nq * Nk, Nq * Nk, Nk, 1});
  tensor4<double> want(B, Nq, H, s.dv());
  tensor3<double> want_lse(B, H, Nq);
  reference_attention(p.q.cview(), p.k.cview(), p.v.cview(), want.view, rp, want_lse.view);

  tensor4<TO> got(B, Nq, H, s.dv(), s.out_layout);  // NaN-filled: unwritten elements fail
  tensor3<TO> got_lse(B, H, Nq);
  backend.template block_sparse<T, TO>(p, mask, got, &got_lse);
  const tolerance tol = tolerance_for<T>();
  const error_stats e = compare(got.view, want.view);
  INFO("out: max abs error " << e.max_abs << ", max |ref| " << e.max_ref << ", rel " << e.rel());
  CHECK_FALSE(e.mismatched_nonfinite);
  CHECK(e.rel() <= tol.out_rel * s.tolerance_factor);
  const double lse_err = lse_abs_error(got_lse.view, want_lse.view);
  INFO("lse: max abs error " << lse_err);
  CHECK(lse_err <= tol.lse_abs * s.tolerance_factor);
}

// Random masks of several block shapes (aligned with the kernel tiles or not, blocks larger than
// the sequence), masks broadcast over batch / heads, empty rows and an empty mask, geometric masks
// with the matching elementwise masks, every attention_params field, odd head dims, GQA, layouts.
template <class T, class Backend>
void run_block_sparse_suite(Backend& backend, bool small) {
  spec base;
  base.B = 2, base.Nq = small ? 70 : 150, base.Nk = small ? 90 : 260, base.Hq = 4, base.Hkv = 2, base.D = 64;
  std::uint64_t seed = 1;
  SECTION("random masks: block shapes, broadcast axes, empty rows, empty mask") {
    for (auto [bq, bk] : {std::pair<index_t, index_t>{16, 16}, {32, 48}, {100, 37}, {7, 200}, {64, 64}}) {
      check_block_sparse<T>(backend, base, random_block_mask(base.B, base.Hq, base.Nq, base.Nk, bq, bk, 0.4, seed++));
      spec c = base;
      c.causal = true;
      check_block_sparse<T>(backend, c, random_block_mask(1, c.Hq, c.Nq, c.Nk, bq, bk, 0.5, seed++, 3));
    }
    check_block_sparse<T>(backend, base, random_block_mask(base.B, 1, base.Nq, base.Nk, 24, 40, 0.3, seed++));
    check_block_sparse<T>(backend, base, random_block_mask(1, 1, base.Nq, base.Nk, 24, 40, 0.0, seed++));
  }
  SECTION("geometric masks with causal and window masking") {
    spec c = base;
    c.causal = true;
    check_block_sparse<T>(backend, c, block_mask::causal(32, 32, c.Nq, c.Nk));
    c.window_left = 20;
    check_block_sparse<T>(backend, c, block_mask::unite(block_mask::local(16, 16, c.Nq, c.Nk, 2, 0),
                                                       block_mask::global(16, 16, c.Nq, c.Nk, 1)));
  }
  SECTION("every attention_params field, head dims, GQA, layouts, Nq != Nk") {
    spec c = base;
    c.causal = true, c.window_left = 40, c.softcap = 5.f, c.bias = bias_kind::full, c.alibi = true;
    c.kv_lengths = {base.Nk - 17, base.Nk / 2};
    check_block_sparse<T>(backend, c, random_block_mask(c.B, c.Hq, c.Nq, c.Nk, 32, 32, 0.6, seed++));
    for (index_t D : {index_t(33), index_t(128), index_t(256)}) {
      spec d = base;
      d.D = D;
      d.Hq = 8;
      check_block_sparse<T>(backend, d, random_block_mask(d.B, d.Hq, d.Nq, d.Nk, 32, 16, 0.5, seed++));
    }
    spec l = base;
    l.in_layout = layout::bhsd, l.out_layout = layout::padded, l.Nq = 5, l.Hq = 8, l.Hkv = 1;
    check_block_sparse<T>(backend, l, random_block_mask(l.B, l.Hq, l.Nq, l.Nk, 4, 16, 0.5, seed++));
    spec e = base;
    e.Nq = 0;  // no queries: nothing happens
    check_block_sparse<T>(backend, e, random_block_mask(1, 1, e.Nq, e.Nk, 16, 16, 0.5, seed++));
  }
}

// A full mask visits exactly flash_attention's tiles in its order: bitwise equal results (flash's
// split-KV path is not taken at this many rows).
template <class T, class Backend>
void check_full_mask_equals_flash(Backend& backend) {
  using TO = accum_t<T>;
  spec s;
  s.B = 2, s.Nq = 130, s.Nk = 150, s.Hq = 4, s.Hkv = 2, s.D = 64, s.causal = true;
  const problem<T> p = make_problem<T>(s);
  tensor4<TO> a(s.B, s.Nq, s.Hq, s.D), b(s.B, s.Nq, s.Hq, s.D);
  tensor3<TO> la(s.B, s.Hq, s.Nq), lb(s.B, s.Hq, s.Nq);
  backend.template flash<T, TO>(p, a, &la);
  backend.template block_sparse<T, TO>(p, block_mask::full(32, 32, s.Nq, s.Nk), b, &lb);
  CHECK(std::memcmp(a.buf.data(), b.buf.data(), a.buf.size() * sizeof(TO)) == 0);
  CHECK(std::memcmp(la.buf.data(), lb.buf.data(), la.buf.size() * sizeof(TO)) == 0);
}

// A mask whose blocks do not match the problem: the CPU operator's message, nothing written.
template <class Backend>
void check_block_sparse_errors(Backend& backend) {
  spec s;
  s.B = 1, s.Nq = 40, s.Nk = 40, s.Hq = 2, s.Hkv = 1, s.D = 64;
  const problem<float> p = make_problem<float>(s);
  tensor4<float> out(1, 40, 2, 64);
  const std::vector<float> before = out.buf;
  require_error([&] { backend.template block_sparse<float, float>(p, block_mask::full(16, 16, 40, 50), out, nullptr); },
                {"cuda::block_sparse_attention", "mask"});
  const block_mask three_batches = block_mask::full(16, 16, 40, 40, 3);
  require_error([&] { backend.template block_sparse<float, float>(p, three_batches, out, nullptr); },
                {"cuda::block_sparse_attention", "mask", "(batch, heads, q_blocks, k_blocks)"});
  CHECK(std::memcmp(out.buf.data(), before.data(), before.size() * sizeof(float)) == 0);
}

}  // namespace attnkit::test::cuda_cases
