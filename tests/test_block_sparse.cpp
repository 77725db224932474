// block_sparse_attention and block_mask.
//  * A full mask reproduces flash_attention bit for bit (same key tiles in the same order, and each
//    query row's arithmetic does not depend on which rows share its tile) whenever the row groups'
//    first allowed keys coincide with flash's: always without params.window_left, and with it when
//    the mask's block_q equals flash_tiles::block_q (same row groups). Otherwise (window_left with
//    other block_q) the key tiles start elsewhere and it agrees within the fp32 tolerance below.
//    Flash's decode path (Nq <= flash_tiles::decode_max_q, float) is a different computation, so
//    the bitwise cases use Nq > flash_tiles::decode_max_q.
//  * Any mask equals reference_attention (double) with an extra bias that is 0 on active tiles and
//    -inf elsewhere. Tolerances as in test_flash.cpp: max |out - ref| / max |ref| <= 2e-5 for
//    float, bf16, f16 inputs, 1e-12 for double; lse absolute error <= 2e-5 / 1e-12.
#include "block_sparse_cases.hpp"

using namespace attnkit;
using test::attn_case;
using test::layout;
using test::tensor3;
using test::tensor4;

using test::check_masked;
using test::grid_view;
using test::random_grid;
using test::random_mask;

namespace {

constexpr double tol_d = 1e-12;  // float tolerance 2e-5: test::check_masked's default
constexpr float ninf = -std::numeric_limits<float>::infinity();

// Inputs of a case, materialised once so two operators can run on identical memory.
template <class T>
struct inputs {
  tensor4<T> q, k, v;
  std::vector<float> slopes;
  std::vector<index_t> lengths;
  attention_params p;
  explicit inputs(const attn_case& c)
      : q(c.B, c.Nq, c.Hq, c.D, c.lay), k(c.B, c.Nk, c.Hkv, c.D, c.lay), v(c.B, c.Nk, c.Hkv, c.dv(), c.lay),
        slopes(c.slopes), lengths(c.lengths), p(c.p) {
    test::fill_uniform(q, c.seed * 3 + 1, c.q_amp);
    test::fill_uniform(k, c.seed * 3 + 2, c.k_amp);
    test::fill_uniform(v, c.seed * 3 + 3, c.v_amp);
    if (!c.bias_data.empty()) {
      const auto& e = c.bias_extents;
      p.bias = tensor_view<const float, 4>(c.bias_data.data(), e, {e[1] * e[2] * e[3], e[2] * e[3], e[3], 1});
    }
    if (!slopes.empty()) p.alibi_slopes = slopes.data();
    if (!lengths.empty()) p.kv_lengths = lengths.data();
  }
};

template <class O>
bool same_bits(const std::vector<O>& a, const std::vector<O>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(O)) == 0;
}

// block_sparse_attention(mask) and flash_attention on the same inputs: bitwise equal outputs and lse.
template <class T, class O = float>
void check_bitwise_flash(const attn_case& c, const block_mask& mask) {
  INFO(test::describe(c) << " dtype=" << element_name<T>() << " blocks=" << mask.block_q() << "x" << mask.block_k());
  inputs<T> in(c);
  tensor4<O> o1(c.B, c.Nq, c.Hq, c.dv(), c.lay), o2(c.B, c.Nq, c.Hq, c.dv(), c.lay);
  tensor3<O> l1(c.B, c.Hq, c.Nq), l2(c.B, c.Hq, c.Nq);
  block_sparse_attention(in.q.cview(), in.k.cview(), in.v.cview(), o1.view, mask, in.p, l1.view);
  flash_attention(in.q.cview(), in.k.cview(), in.v.cview(), o2.view, in.p, l2.view);
  CHECK(same_bits(o1.buf, o2.buf));
  CHECK(same_bits(l1.buf, l2.buf));
}

std::vector<attn_case> option_cases(const attn_case& base) {
  std::vector<attn_case> cs;
  auto add = [&](auto edit) {
    attn_case c = base;
    edit(c);
    cs.push_back(c);
  };
  add([](attn_case&) {});
  add([](attn_case& c) { c.p.causal = true; });
  add([](attn_case& c) { c.p.window_right = 30; });
  add([](attn_case& c) { c.p.causal = true; c.lengths.assign(std::size_t(c.B), c.Nk - 41); });
  add([](attn_case& c) {
    c.p.softcap = 2.f;
    c.q_amp = 3.f;
    c.slopes.assign(std::size_t(c.Hq), 0.05f);
    c.bias_extents = {c.B, 1, c.Nq, c.Nk};
    c.bias_data = test::random_bias(std::size_t(c.B * c.Nq * c.Nk), 11, true);
  });
  return cs;
}

}  // namespace

TEST_CASE("block_sparse: a full mask reproduces flash_attention bit for bit") {
  attn_case base;
  base.B = 2;
  base.Nq = 203;
  base.Nk = 261;
  base.Hq = 4;
  base.Hkv = 2;
  base.D = 40;
  const index_t fq = flash_tiles::group_q;
  const std::vector<std::pair<index_t, index_t>> blocks{{16, 16}, {fq, 64}, {64, 64}, {128, 128}, {100, 37}, {512, 512}};
  for (const auto& c : option_cases(base))
    for (auto [bq, bk] : blocks) {
      const auto mask = block_mask::full(bq, bk, c.Nq, c.Nk);
      check_bitwise_flash<float>(c, mask);
      if (bq == 64) {
        check_bitwise_flash<bf16>(c, mask);
        check_bitwise_flash<double, double>(c, mask);
      }
    }
  // window_left: bitwise when block_q is flash's row group, else within tolerance.
  attn_case w = base;
  w.p.window_left = 70;
  w.p.causal = true;
  check_bitwise_flash<float>(w, block_mask::full(fq, 64, w.Nq, w.Nk));
  check_bitwise_flash<float>(w, block_mask::full(fq, 100, w.Nq, w.Nk));
  check_masked(w, block_mask::full(2 * fq, 100, w.Nq, w.Nk));
  check_masked(w, block_mask::full(128, 64, w.Nq, w.Nk));
  check_masked(w, block_mask::full(16, 16, w.Nq, w.Nk));
  // Layouts and Nq != Nk the other way round.
  for (auto lay : {layout::bhsd, layout::padded, layout::strided}) {
    attn_case c = base;
    c.lay = lay;
    c.Nq = 150;
    c.Nk = 90;
    c.p.causal = true;
    check_bitwise_flash<float>(c, block_mask::full(64, 32, c.Nq, c.Nk));
    check_bitwise_flash<f16>(c, block_mask::full(128, 128, c.Nq, c.Nk));
  }
}

TEST_CASE("block_sparse: a causal block mask with params.causal reproduces causal flash bit for bit") {
  attn_case c;
  c.B = 1;
  c.Nq = 300;
  c.Nk = 300;
  c.Hq = 2;
  c.D = 32;
  c.p.causal = true;
  for (auto [bq, bk] : {std::pair<index_t, index_t>{64, 64}, {128, 128}, {32, 96}}) {
    const auto mask = block_mask::causal(bq, bk, c.Nq, c.Nk);
    CHECK(mask.density() < 0.75);
    check_bitwise_flash<float>(c, mask);
  }
  c.Nk = 420;  // bottom-right aligned diagonal
  check_bitwise_flash<float>(c, block_mask::causal(64, 64, c.Nq, c.Nk));
}

TEST_CASE("block_sparse: random masks equal reference_attention with a 0 / -inf bias") {
  attn_case base;
  base.B = 2;
  base.Nq = 211;   // partial last query block for every block_q below
  base.Nk = 277;   // and key block
  base.Hq = 4;
  base.Hkv = 4;
  base.D = 24;
  const std::vector<std::pair<index_t, index_t>> blocks{{16, 16}, {64, 64}, {200, 32}, {50, 70}, {64, 300}, {128, 128}};
  std::uint64_t seed = 100;
  std::size_t pick = 0;
  for (const auto& c : option_cases(base))
    for (double density : {0.15, 0.5}) {
      const auto [bq, bk] = blocks[pick++ % blocks.size()];
      check_masked(c, random_mask(c, bq, bk, density, ++seed, 5));
    }
  // Window on both sides with a sparse mask, and scattered single-key blocks.
  attn_case w = base;
  w.p.window_left = 40;
  w.p.window_right = 10;
  check_masked(w, random_mask(w, 32, 16, 0.6, 7));
  check_masked(base, random_mask(base, 8, 1, 0.3, 8));
  check_masked(base, random_mask(base, 1, 8, 0.3, 9));
}

TEST_CASE("block_sparse: grouped-query heads, layouts and element types") {
  for (auto lay : {layout::bshd, layout::bhsd, layout::padded, layout::strided}) {
    attn_case c;
    c.B = 2;
    c.Nq = 97;
    c.Nk = 130;
    c.Hq = 6;
    c.Hkv = 2;
    c.D = 19;
    c.Dv = 27;
    c.lay = lay;
    c.p.causal = lay == layout::bhsd;
    const auto mask = random_mask(c, 32, 32, 0.4, 21 + std::uint64_t(lay), 4);
    check_masked<float>(c, mask);
    check_masked<bf16>(c, mask);
    check_masked<f16>(c, mask);
    check_masked<double, double>(c, mask, tol_d);
  }
  attn_case mqa;  // multi-query, long keys, mask broadcast over heads
  mqa.Nq = 64;
  mqa.Nk = 1500;
  mqa.Hq = 8;
  mqa.Hkv = 1;
  mqa.D = 64;
  const index_t nkb = (1500 + 127) / 128;
  const auto grid = random_grid(1, 1, 1, nkb, 0.3, 5);
  const tensor_view<const std::uint8_t, 4> bcast(grid.data(), {1, 8, 1, nkb}, {0, 0, nkb, 1});
  const auto mask = block_mask::from_dense(64, 128, bcast);
  CHECK(mask.stored_rows() == 1);
  CHECK(mask.heads() == 8);
  check_masked(mqa, mask);
  check_masked<f16>(mqa, mask);
}

TEST_CASE("block_sparse: a mask with batch and heads extent 1 broadcasts") {
  attn_case c;
  c.B = 3;
  c.Nq = 70;
  c.Nk = 90;
  c.Hq = 4;
  c.Hkv = 2;
  c.D = 16;
  const auto grid = random_grid(1, 1, 3, 3, 0.5, 3);
  const auto mask = block_mask::from_dense(32, 32, grid_view(grid, 1, 1, 3, 3));
  check_masked(c, mask);
  check_masked(c, block_mask::unite(block_mask::global(32, 32, 70, 90, 1), block_mask::local(32, 32, 70, 90, 0, 0)));
}

TEST_CASE("block_sparse: rows without an active key give 0 and lse -inf") {
  attn_case c;
  c.Nq = 100;
  c.Nk = 100;
  c.Hq = 2;
  c.D = 8;
  std::vector<std::uint8_t> grid{1, 0, 0, 0,  // (h 0) query block 0 sees key block 0
                                 0, 0, 0, 0,  // query block 1: nothing
                                 0, 0, 0, 1,  // query block 2: key block 3 (future under causal)
                                 1, 1, 1, 1,  //
                                 0, 0, 0, 0,  // (h 1): query block 0 nothing
                                 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0};
  const auto mask = block_mask::from_dense(32, 32, grid_view(grid, 1, 2, 4, 4));
  c.p.causal = true;
  check_masked(c, mask);
  inputs<float> in(c);
  tensor4<float> out(1, 100, 2, 8);
  tensor3<float> lse(1, 2, 100);
  block_sparse_attention(in.q.cview(), in.k.cview(), in.v.cview(), out.view, mask, in.p, lse.view);
  auto empty_row = [&](index_t i, index_t h) {
    bool zero = lse.view(0, h, i) == ninf;
    for (index_t d = 0; d < 8; ++d) zero = zero && out(0, i, h, d) == 0.f;
    return zero;
  };
  for (index_t i = 0; i < 100; ++i) {
    CHECK(empty_row(i, 0) == (i >= 32 && i < 96));  // block 1 empty, block 2 only future keys
    CHECK(empty_row(i, 1) == (i < 32 || (i >= 64 && i < 96)));
  }
}

TEST_CASE("block_mask: builders, density, storage") {
  const index_t Nq = 300, Nk = 420, bq = 64, bk = 48;
  const index_t nqb = 5, nkb = 9, off = Nk - Nq;
  auto dense = [&](const block_mask& m, index_t b = 0, index_t h = 0) {
    std::vector<int> r;
    for (index_t qb = 0; qb < m.q_blocks(); ++qb)
      for (index_t kb = 0; kb < m.k_blocks(); ++kb) r.push_back(m.is_active(b, h, qb, kb));
    return r;
  };
  auto expect = [&](auto pred) {
    std::vector<int> r;
    for (index_t qb = 0; qb < nqb; ++qb)
      for (index_t kb = 0; kb < nkb; ++kb) r.push_back(pred(qb, kb));
    return r;
  };
  const auto causal = block_mask::causal(bq, bk, Nq, Nk);
  CHECK(causal.q_blocks() == nqb);
  CHECK(causal.k_blocks() == nkb);
  // Active iff some (i, j) in the tile has j <= i + off: the tile's first key vs its last row.
  CHECK(dense(causal) == expect([&](index_t qb, index_t kb) { return kb * bk <= std::min(Nq, (qb + 1) * bq) - 1 + off; }));
  const auto local = block_mask::local(bq, bk, Nq, Nk, 1, 2);
  CHECK(dense(local) == expect([&](index_t qb, index_t kb) {
    const index_t d0 = (qb * bq + off) / bk, d1 = (std::min(Nq, (qb + 1) * bq) - 1 + off) / bk;
    return kb >= d0 - 1 && kb <= d1 + 2;
  }));
  const auto global = block_mask::global(bq, bk, Nq, Nk, 2);
  CHECK(dense(global) == expect([](index_t, index_t kb) { return kb < 2; }));
  const auto full = block_mask::full(bq, bk, Nq, Nk, 2, 3);
  CHECK(full.density() == 1.0);
  CHECK(full.stored_rows() == nqb);
  CHECK(full.active_tiles() == 2 * 3 * nqb * nkb);
  const auto both = block_mask::unite(global, local);
  CHECK(dense(both) == expect([&](index_t qb, index_t kb) { return dense(global)[std::size_t(qb * nkb + kb)] || dense(local)[std::size_t(qb * nkb + kb)]; }));
  const auto band_causal = block_mask::intersect(local, causal);
  CHECK(dense(band_causal) == expect([&](index_t qb, index_t kb) { return dense(local)[std::size_t(qb * nkb + kb)] && dense(causal)[std::size_t(qb * nkb + kb)]; }));
  // Runs are merged: a band is one run per row.
  for (index_t qb = 0; qb < nqb; ++qb) CHECK(local.active(0, 0, qb).size() <= 1);
  CHECK(block_mask::unite(block_mask::global(bq, bk, Nq, Nk, 3), local).active(0, 0, 1).size() == 1);

  // from_dense: density, and stride-0 axes stored once.
  const auto grid = random_grid(2, 3, nqb, nkb, 0.3, 4);
  const auto m = block_mask::from_dense(bq, bk, grid_view(grid, 2, 3, nqb, nkb));
  CHECK(m.stored_rows() == 2 * 3 * nqb);
  index_t on = 0;
  for (index_t b = 0; b < 2; ++b)
    for (index_t h = 0; h < 3; ++h)
      for (index_t qb = 0; qb < nqb; ++qb)
        for (index_t kb = 0; kb < nkb; ++kb) {
          const bool a = grid[std::size_t(((b * 3 + h) * nqb + qb) * nkb + kb)] != 0;
          on += a;
          CHECK(m.is_active(b, h, qb, kb) == a);
        }
  CHECK(m.active_tiles() == on);
  CHECK(m.density() == Approx(double(on) / double(2 * 3 * nqb * nkb)));
  const tensor_view<const std::uint8_t, 4> shared(grid.data(), {4, 3, nqb, nkb}, {0, nqb * nkb, nkb, 1});
  const auto ms = block_mask::from_dense(bq, bk, shared);
  CHECK(ms.stored_rows() == 3 * nqb);
  CHECK(ms.batch() == 4);
  for (index_t b = 0; b < 4; ++b) CHECK(dense(ms, b, 2) == dense(m, 0, 2));
  const tensor_view<const std::uint8_t, 4> shared_h(grid.data(), {2, 5, nqb, nkb}, {3 * nqb * nkb, 0, nkb, 1});
  CHECK(block_mask::from_dense(bq, bk, shared_h).stored_rows() == 2 * nqb);

  // top_k: highest scores, ties to the lower index, -inf / NaN never chosen.
  std::vector<float> sc{0.1f, 0.5f, 0.5f, ninf, 0.9f, std::numeric_limits<float>::quiet_NaN(), 0.2f,  //
                        ninf, ninf, 1.f,  ninf, ninf, ninf, ninf};
  const tensor_view<const float, 4> scv(sc.data(), {1, 1, 2, 7}, {14, 14, 7, 1});
  const auto tk = block_mask::top_k(8, 8, scv, 3);
  CHECK(dense(tk) == std::vector<int>{0, 1, 1, 0, 1, 0, 0, /**/ 0, 0, 1, 0, 0, 0, 0});
  CHECK(block_mask::top_k(8, 8, scv, 0).active_tiles() == 0);
  CHECK(block_mask::top_k(8, 8, scv, 100).active_tiles() == 6);
}

TEST_CASE("block_sparse: empty problems") {
  tensor4<float> q(1, 4, 1, 8), k(1, 0, 1, 8), v(1, 0, 1, 8), out(1, 4, 1, 8);
  test::fill_uniform(q, 1);
  tensor3<float> lse(1, 1, 4);
  block_sparse_attention(q.view, k.view, v.view, out.view, block_mask::full(2, 2, 4, 0), {}, lse.view);
  for (index_t i = 0; i < 4; ++i) {
    CHECK(lse.view(0, 0, i) == ninf);
    CHECK(out(0, i, 0, 7) == 0.f);
  }
  tensor4<float> q0(1, 0, 1, 8), o0(1, 0, 1, 8), kk(1, 5, 1, 8), vv(1, 5, 1, 8);
  block_sparse_attention(q0.view, kk.view, vv.view, o0.view, block_mask::full(2, 2, 0, 5));
  CHECK(block_mask::full(2, 2, 0, 5).density() == 0.0);
  CHECK(block_mask().density() == 0.0);
}

TEST_CASE("block_sparse_attention and block_mask validate input and write nothing on failure") {
  tensor4<float> q(2, 40, 4, 8), k(2, 50, 2, 8), v(2, 50, 2, 8), out(2, 40, 4, 8);
  test::fill_uniform(q, 1);
  test::fill_uniform(k, 2);
  test::fill_uniform(v, 3);
  const float sentinel = 777.f;
  std::fill(out.buf.begin(), out.buf.end(), sentinel);
  tensor3<float> lse(2, 4, 40, sentinel);
  auto run = [&](const block_mask& m) { block_sparse_attention(q.view, k.view, v.view, out.view, m, {}, lse.view); };
  test::require_error([&] { run(block_mask::full(16, 16, 40, 70)); }, {"block_sparse_attention", "mask", "(2, 4, 3, 4)", "(1, 1, 3, 5)"});
  test::require_error([&] { run(block_mask::full(16, 16, 50, 50)); }, {"block_sparse_attention", "mask"});
  test::require_error([&] { run(block_mask::full(16, 16, 40, 50, 3)); }, {"block_sparse_attention", "mask", "(3, 1, 3, 4)"});
  test::require_error([&] { run(block_mask::full(16, 16, 40, 50, 1, 2)); }, {"block_sparse_attention", "mask"});
  tensor4<float> v_bad(2, 50, 3, 8);
  test::require_error([&] { block_sparse_attention(q.view, k.view, v_bad.view, out.view, block_mask::full(16, 16, 40, 50)); },
                      {"block_sparse_attention", "v"});
  attention_params p;
  p.softcap = -1.f;
  test::require_error([&] { block_sparse_attention(q.view, k.view, v.view, out.view, block_mask::full(16, 16, 40, 50), p); },
                      {"block_sparse_attention", "params.softcap"});
  CHECK(test::untouched(out.buf, sentinel));
  CHECK(test::untouched(lse.buf, sentinel));
  run(block_mask::full(16, 16, 40, 50, 2, 4));  // and the matching shapes run
  CHECK_FALSE(test::untouched(out.buf, sentinel));

  test::require_error([] { block_mask::full(0, 16, 40, 50); }, {"block_mask::full", "block_q", ">= 1", "got 0"});
  test::require_error([] { block_mask::causal(16, -2, 40, 50); }, {"block_mask::causal", "block_k"});
  test::require_error([] { block_mask::local(16, 16, 40, 50, -1, 0); }, {"block_mask::local", "blocks_left"});
  test::require_error([] { block_mask::local(16, 16, 40, 50, 0, -1); }, {"block_mask::local", "blocks_right"});
  test::require_error([] { block_mask::global(16, 16, 40, -50, 1); }, {"block_mask::global", "kv_len"});
  test::require_error([] { block_mask::global(16, 16, 40, 50, -1); }, {"block_mask::global", "first_blocks"});
  test::require_error([] { block_mask::full(16, 16, 40, 50, 0); }, {"block_mask::full", "batch"});
  std::vector<float> sc(4, 0.f);
  test::require_error([&] { block_mask::top_k(4, 4, tensor_view<const float, 4>(sc.data(), {1, 1, 2, 2}, {4, 4, 2, 1}), -1); },
                      {"block_mask::top_k", "k"});
  test::require_error([] { block_mask::unite(block_mask::full(16, 16, 40, 50), block_mask::full(16, 32, 40, 50)); },
                      {"block_mask::unite", "b"});
  test::require_error([] { block_mask::intersect(block_mask::full(16, 16, 40, 50, 2), block_mask::full(16, 16, 40, 50, 3)); },
                      {"block_mask::intersect", "b"});
  const auto m = block_mask::full(16, 16, 40, 50, 2, 1);
  test::require_error([&] { (void)m.is_active(2, 0, 0, 0); }, {"block_mask::active", "b"});
  test::require_error([&] { (void)m.active(0, 0, 3); }, {"block_mask::active", "qb"});
  CHECK(m.is_active(1, 7, 2, 3));  // heads extent 1 broadcasts
  CHECK_FALSE(m.is_active(1, 0, 2, 4));
}

TEST_CASE("block_sparse: bitwise identical results for 1 and 2 threads") {
#if defined(_OPENMP)
  attn_case c;
  c.B = 2;
  c.Nq = 333;
  c.Nk = 1100;
  c.Hq = 4;
  c.Hkv = 2;
  c.D = 40;
  c.p.causal = true;
  const auto mask = random_mask(c, 128, 64, 0.4, 77);
  inputs<float> in(c);
  tensor4<float> o1(c.B, c.Nq, c.Hq, c.D), o2(c.B, c.Nq, c.Hq, c.D);
  tensor3<float> l1(c.B, c.Hq, c.Nq), l2(c.B, c.Hq, c.Nq);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  block_sparse_attention(in.q.cview(), in.k.cview(), in.v.cview(), o1.view, mask, in.p, l1.view);
  omp_set_num_threads(2);
  block_sparse_attention(in.q.cview(), in.k.cview(), in.v.cview(), o2.view, mask, in.p, l2.view);
  omp_set_num_threads(saved);
  CHECK(same_bits(o1.buf, o2.buf));
  CHECK(same_bits(l1.buf, l2.buf));
#else
  WARN("built without OpenMP: nothing to compare");
  SUCCEED();
#endif
}
