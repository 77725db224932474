// flash_attention and merge_attention_states against reference_attention in double precision.
// Tolerances: max |out - ref| / max |ref| <= 2e-5 for float, bf16 and f16 inputs (the reference
// runs on the same rounded inputs, so only float accumulation error remains), 1e-12 for double;
// log-sum-exp error <= 2e-5 (float) / 1e-12 (double) times max(1, max |lse|).
#include "flash_cases.hpp"

using namespace attnkit;
using test::attn_case;
using test::layout;
using test::tensor3;
using test::tensor4;

namespace {

constexpr double tol_f = 2e-5, tol_d = 1e-12;

// Inputs passed as views of const elements, as a caller holding read-only buffers would (the
// differential and concurrency tests pass mutable views).
template <class T>
tensor_view<const T, 4> as_const(const tensor_view<T, 4>& x) {
  return x;
}

auto flash = [](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) {
  flash_attention(as_const(q), as_const(k), as_const(v), out, p, lse);
};

template <class T = float, class O = float>
void check(const attn_case& c, double tol = tol_f) {
  INFO(test::describe(c) << " dtype=" << element_name<T>());
  const auto r = test::run_against_reference<T, O>(c, flash);
  CHECK_FALSE(r.out.mismatched_nonfinite);
  CHECK(r.out.rel() <= tol);
  CHECK(r.lse_err <= tol);
}

}  // namespace

TEST_CASE("flash: head dims including ones that are not multiples of the SIMD width") {
  for (index_t D : {1, 8, 31, 64, 80, 96, 128, 256})
    for (bool causal : {false, true}) {
      attn_case c;
      c.Nq = 37;
      c.Nk = 53;
      c.D = D;
      c.Hq = 2;
      c.p.causal = causal;
      c.seed = std::uint64_t(D);
      check(c);
    }
}

TEST_CASE("flash: Nq != Nk both ways, value dim != head dim, batch > 1") {
  for (auto [nq, nk] : {std::pair<index_t, index_t>{5, 200}, {200, 5}, {1, 1}, {130, 129}, {49, 97}})
    for (bool causal : {false, true}) {
      attn_case c;
      c.B = 2;
      c.Nq = nq;
      c.Nk = nk;
      c.D = 24;
      c.Dv = 40;
      c.Hq = 3;
      c.Hkv = 3;
      c.p.causal = causal;
      check(c);
    }
}

TEST_CASE("flash: grouped-query and multi-query heads, prefill and decode") {
  for (index_t ratio : {1, 4, 8})
    for (index_t nq : {1, 3, 13, 70}) {
      attn_case c;
      c.Hkv = 2;
      c.Hq = 2 * ratio;
      c.Nq = nq;
      c.Nk = 300;
      c.D = 32;
      c.p.causal = nq > 1;
      check(c);
    }
  attn_case mqa;
  mqa.Hq = 8;
  mqa.Hkv = 1;
  mqa.Nq = 2;
  mqa.Nk = 2500;
  mqa.D = 64;
  check(mqa);
}

TEST_CASE("flash: single-token decode over a 40k-key cache") {
  attn_case c;
  c.Nq = 1;
  c.Nk = 40000;
  c.Hq = 8;
  c.Hkv = 2;
  c.D = 64;
  check(c);
  check<f16>(c);
}

TEST_CASE("flash: decode reads K/V rows of every width page-interleaved, tails included") {
  // The decode visits a tile's keys j, j + P, j + 2P, ... with P = 4096 / (bytes of one key's row,
  // all kv heads) when that divides a page (BSHD): rows of 2 KiB (P = 2) up to 256 B (P = 16), and
  // P = 1 otherwise or when heads are outermost. Nk leaves partial blocks in the last chunk's tile.
  struct shape {
    index_t Hkv, D;
  };
  for (auto [hkv, d] : {shape{8, 64}, shape{4, 64}, shape{2, 64}, shape{1, 64}, shape{3, 40}})
    for (auto lay : {layout::bshd, layout::bhsd})
      for (index_t nq : {1, 3}) {
        attn_case c;
        c.Nq = nq;
        c.Nk = 997;
        c.Hkv = hkv;
        c.Hq = 2 * hkv;
        c.D = d;
        c.lay = lay;
        c.p.causal = nq > 1;
        c.seed = std::uint64_t(hkv * 1000 + d);
        check(c);       // f32 rows: 2 KiB at Hkv 8 (P 2), 1 KiB (P 4), 512 B (P 8), 256 B (P 16)
        check<f16>(c);  // f16 rows: half of those (P 4 .. 16, then 128 B: P 16 capped)
      }
}

TEST_CASE("flash: every mask option alone and combined") {
  for (index_t nq : {1, 4, 61}) {
    const index_t nk = 150;
    attn_case base;
    base.B = 2;
    base.Nq = nq;
    base.Nk = nk;
    base.Hq = 4;
    base.Hkv = 2;
    base.D = 20;
    test::case_table cs{base};
    cs.add([](attn_case& c) { c.p.causal = true; });
    cs.add([](attn_case& c) { c.p.window_left = 17; });
    cs.add([](attn_case& c) { c.p.window_right = 5; });
    cs.add([](attn_case& c) { c.p.window_left = 0; c.p.window_right = 0; });
    cs.add([](attn_case& c) { c.p.causal = true; c.p.window_left = 70; });
    cs.add([](attn_case& c) { c.p.softcap = 1.5f; c.q_amp = 4.f; });
    cs.add([&](attn_case& c) {
      c.bias_extents = {c.B, c.Hq, c.Nq, nk};
      c.bias_data = test::random_bias(std::size_t(c.B * c.Hq * c.Nq * nk), 5, true);
    });
    cs.add([&](attn_case& c) {  // bias broadcast over batch and query rows
      c.bias_extents = {1, c.Hq, 1, nk};
      c.bias_data = test::random_bias(std::size_t(c.Hq * nk), 6, false);
    });
    cs.add([](attn_case& c) { c.slopes = {0.5f, 0.25f, 0.125f, 0.0625f}; });
    cs.add([](attn_case& c) { c.lengths = {150, 37}; c.p.causal = true; });
    cs.add([](attn_case& c) { c.lengths = {0, 90}; });
    cs.add([&](attn_case& c) {
      c.p.causal = true;
      c.p.window_left = 40;
      c.p.softcap = 3.f;
      c.slopes = {0.3f, 0.2f, 0.1f, 0.05f};
      c.lengths = {120, 150};
      c.bias_extents = {c.B, 1, c.Nq, nk};
      c.bias_data = test::random_bias(std::size_t(c.B * c.Nq * nk), 7, true);
    });
    for (const auto& c : cs.cases) check(c);
  }
}

// A prefill row group (flash_tiles::group_q rows) runs each key tile over only the query columns
// whose allowed keys meet it: masks whose edges cross a group at many tiles, groups cut short by
// Nq, Nq on both sides of Nk, rows that see nothing, and the bf16 / f16 / double paths.
TEST_CASE("flash: masked key tiles skip the columns they are masked for, exactly") {
  const index_t G = flash_tiles::group_q;
  for (index_t nk : {G + 70, 3 * G + 5, G / 2 + 3}) {
    attn_case base;
    base.B = 2;
    base.Nq = 2 * G + 29;
    base.Nk = nk;
    base.Hq = 2;
    base.Hkv = 1;
    base.D = 19;
    test::case_table cs{base};
    cs.add([](attn_case& c) { c.p.causal = true; });
    cs.add([](attn_case& c) { c.p.window_left = 37; c.p.window_right = 3; });
    cs.add([](attn_case& c) { c.p.causal = true; c.p.window_left = 100; });
    cs.add([](attn_case& c) { c.p.window_left = 0; c.p.window_right = 0; });
    cs.add([&](attn_case& c) { c.p.causal = true; c.lengths = {nk / 3, nk}; });
    cs.add([&](attn_case& c) { c.p.window_left = 150; c.lengths = {nk, nk - 17}; c.slopes = {0.2f, 0.1f}; });
    for (const auto& c : cs.cases) {
      check(c);
      if (c.p.causal && c.lengths.empty()) {
        check<bf16>(c);
        check<f16>(c);
        check<double, double>(c, tol_d);
      }
    }
  }
}

TEST_CASE("flash: fully masked rows give 0 and lse -inf") {
  // window 0 with Nq > Nk: the first Nq - Nk rows see no key; kv_lengths 0 masks a whole batch.
  attn_case c;
  c.B = 2;
  c.Nq = 70;
  c.Nk = 20;
  c.p.window_left = 0;
  c.p.window_right = 0;
  c.lengths = {20, 0};
  check(c);
  tensor4<float> q(1, 3, 1, 8), k(1, 5, 1, 8), v(1, 5, 1, 8), out(1, 3, 1, 8);
  test::fill_uniform(q, 1);
  test::fill_uniform(k, 2);
  test::fill_uniform(v, 3);
  tensor3<float> lse(1, 1, 3);
  const index_t zero = 0;
  attention_params p;
  p.kv_lengths = &zero;
  for (index_t nq : {3, 1}) {
    flash_attention(q.view.slice(1, 0, nq), k.view, v.view, out.view.slice(1, 0, nq), p, lse.view.slice(2, 0, nq));
    for (index_t i = 0; i < nq; ++i) {
      CHECK(lse.view(0, 0, i) == -std::numeric_limits<float>::infinity());
      for (index_t d = 0; d < 8; ++d) CHECK(out(0, i, 0, d) == 0.f);
    }
  }
}

TEST_CASE("flash: logits near +-1e4 and -inf bias stay exact and finite") {
  // Small integer q and k make every logit exact in float (|q.k| <= 1024, scale 10), so only the
  // softmax arithmetic is measured.
  for (index_t nq : {2, 50}) {
    tensor4<float> q(1, nq, 1, 16), k(1, 40, 1, 16), v(1, 40, 1, 16), out(1, nq, 1, 16);
    auto g = test::rng(9);
    std::uniform_int_distribution<int> u(-8, 8);
    for (auto* t : {&q, &k})
      for (auto& x : t->buf) x = float(u(g));
    test::fill_uniform(v, 10);
    std::vector<float> col(40, 0.f);
    col[3] = -std::numeric_limits<float>::infinity();
    attention_params p;
    p.scale = 10.f;
    p.bias = tensor_view<const float, 4>(col.data(), {1, 1, 1, 40}, {0, 0, 0, 1});
    tensor3<float> lse(1, 1, nq);
    flash_attention(q.view, k.view, v.view, out.view, p, lse.view);
    const auto qd = test::to_double(q.view), kd = test::to_double(k.view), vd = test::to_double(v.view);
    tensor4<double> ref(1, nq, 1, 16);
    tensor3<double> ref_lse(1, 1, nq);
    reference_attention(qd.view, kd.view, vd.view, ref.view, p, ref_lse.view);
    const auto e = test::compare(out.view, ref.view);
    CHECK_FALSE(e.mismatched_nonfinite);
    CHECK(e.rel() <= tol_f);
    double max_lse = 0;
    for (index_t i = 0; i < nq; ++i) max_lse = std::max(max_lse, std::abs(ref_lse.view(0, 0, i)));
    CHECK(max_lse > 1000);  // the case really has huge logits
    CHECK(test::lse_abs_error(lse.view, ref_lse.view) <= 2e-7 * max_lse);
  }
}

TEST_CASE("flash: BHSD, padded and strided views") {
  for (auto lay : {layout::bhsd, layout::padded, layout::strided})
    for (index_t nq : {2, 45}) {
      attn_case c;
      c.B = 2;
      c.Nq = nq;
      c.Nk = 77;
      c.Hq = 4;
      c.Hkv = 2;
      c.D = 19;
      c.lay = lay;
      c.p.causal = true;
      check(c);
      check<bf16>(c);
    }
}

TEST_CASE("flash: bf16, f16 and double inputs") {
  for (index_t nq : {1, 4, 16, 100}) {
    attn_case c;
    c.B = 2;
    c.Nq = nq;
    c.Nk = 1500;
    c.Hq = 4;
    c.Hkv = 1;
    c.D = 64;
    c.p.causal = nq > 1;
    c.p.window_left = 700;
    check<bf16>(c);
    check<f16>(c);
    check<double, double>(c, tol_d);
  }
}

TEST_CASE("flash: bf16 prefill, which uses the BF16 pair dot products where the target has them") {
  INFO("bf16 pair dot path used: " << simd::prefer_bf16_dot);
  for (index_t D : {2, 30, 64, 80, 128})
    for (int variant = 0; variant < 3; ++variant) {
      attn_case c;
      c.B = 2;
      c.Nq = 70;
      c.Nk = 133;
      c.Hq = 4;
      c.Hkv = 2;
      c.D = D;
      c.p.causal = variant != 1;
      if (variant == 1) c.p.softcap = 2.f;
      if (variant == 2) {
        c.slopes = {0.1f, 0.2f, 0.3f, 0.4f};
        c.p.scale = 0.3f;
      }
      c.seed = std::uint64_t(D * 3 + variant);
      check<bf16>(c);
    }
}

TEST_CASE("flash: NaN in one query row stays in that row") {
  for (index_t nq : {3, 40}) {
    tensor4<float> q(1, nq, 2, 8), k(1, 30, 2, 8), v(1, 30, 2, 8), out(1, nq, 2, 8);
    test::fill_uniform(q, 1);
    test::fill_uniform(k, 2);
    test::fill_uniform(v, 3);
    q(0, 1, 1, 3) = std::numeric_limits<float>::quiet_NaN();
    flash_attention(q.view, k.view, v.view, out.view);
    for (index_t i = 0; i < nq; ++i)
      for (index_t h = 0; h < 2; ++h) {
        const bool poisoned = i == 1 && h == 1;
        for (index_t d = 0; d < 8; ++d) CHECK(std::isnan(out(0, i, h, d)) == poisoned);
      }
  }
}

TEST_CASE("flash: empty batch, empty queries and empty keys") {
  tensor4<float> q(1, 4, 1, 8), k(1, 0, 1, 8), v(1, 0, 1, 8), out(1, 4, 1, 8);
  test::fill_uniform(q, 1);
  tensor3<float> lse(1, 1, 4);
  flash_attention(q.view, k.view, v.view, out.view, {}, lse.view);
  for (index_t i = 0; i < 4; ++i) {
    CHECK(lse.view(0, 0, i) == -std::numeric_limits<float>::infinity());
    CHECK(out(0, i, 0, 7) == 0.f);
  }
  tensor4<float> q0(1, 0, 1, 8), o0(1, 0, 1, 8), kk(1, 5, 1, 8), vv(1, 5, 1, 8);
  flash_attention(q0.view, kk.view, vv.view, o0.view);  // nothing to do, must not throw
  tensor4<float> qb(0, 4, 1, 8), kb(0, 5, 1, 8), vb(0, 5, 1, 8), ob(0, 4, 1, 8);
  flash_attention(qb.view, kb.view, vb.view, ob.view);
}

TEST_CASE("flash: bitwise identical results for 1 and 2 threads") {
#if defined(_OPENMP)
  for (index_t nq : {1, 200}) {
    tensor4<float> q(2, nq, 4, 40), k(2, 3000, 2, 40), v(2, 3000, 2, 40), o1(2, nq, 4, 40), o2(2, nq, 4, 40);
    test::fill_uniform(q, 1);
    test::fill_uniform(k, 2);
    test::fill_uniform(v, 3);
    tensor3<float> l1(2, 4, nq), l2(2, 4, nq);
    attention_params p;
    p.causal = true;
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    flash_attention(q.view, k.view, v.view, o1.view, p, l1.view);
    omp_set_num_threads(2);
    flash_attention(q.view, k.view, v.view, o2.view, p, l2.view);
    omp_set_num_threads(saved);
    CHECK(std::memcmp(o1.buf.data(), o2.buf.data(), o1.buf.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(l1.buf.data(), l2.buf.data(), l1.buf.size() * sizeof(float)) == 0);
  }
#else
  WARN("built without OpenMP: nothing to compare");
  SUCCEED();
#endif
}

TEST_CASE("merge_attention_states: two halves of the keys merge into the whole") {
  for (index_t nq : {1, 33}) {
    const index_t B = 2, H = 3, D = 24, Nk = 700, split = 301;
    tensor4<float> q(B, nq, H, D), k(B, Nk, H, D), v(B, Nk, H, D);
    test::fill_uniform(q, 1);
    test::fill_uniform(k, 2);
    test::fill_uniform(v, 3);
    tensor4<float> oa(B, nq, H, D), ob(B, nq, H, D), whole(B, nq, H, D), merged(B, nq, H, D);
    tensor3<float> la(B, H, nq), lb(B, H, nq), lw(B, H, nq), lm(B, H, nq);
    flash_attention(q.view, k.view.slice(1, 0, split), v.view.slice(1, 0, split), oa.view, {}, la.view);
    flash_attention(q.view, k.view.slice(1, split, Nk), v.view.slice(1, split, Nk), ob.view, {}, lb.view);
    flash_attention(q.view, k.view, v.view, whole.view, {}, lw.view);
    merge_attention_states(oa.view, la.view, ob.view, lb.view, merged.view, lm.view);
    CHECK(test::compare(merged.view, whole.view).rel() <= tol_f);
    CHECK(test::lse_abs_error(lm.view, lw.view) <= tol_f);
    // In place into o_a.
    merge_attention_states(oa.view, la.view, ob.view, lb.view, oa.view);
    CHECK(test::compare(oa.view, merged.view).max_abs == 0);
  }
}

TEST_CASE("merge_attention_states: -inf on either or both sides") {
  const float ninf = -std::numeric_limits<float>::infinity();
  tensor4<float> oa(1, 3, 1, 2), ob(1, 3, 1, 2), o(1, 3, 1, 2);
  tensor3<float> la(1, 1, 3), lb(1, 1, 3), l(1, 1, 3);
  for (index_t i = 0; i < 3; ++i)
    for (index_t d = 0; d < 2; ++d) {
      oa(0, i, 0, d) = 1.f + float(d);
      ob(0, i, 0, d) = -4.f;
    }
  oa(0, 2, 0, 0) = std::numeric_limits<float>::quiet_NaN();  // garbage on a side with no keys is ignored
  la.view(0, 0, 0) = 0.5f;
  lb.view(0, 0, 0) = ninf;
  la.view(0, 0, 1) = ninf;
  lb.view(0, 0, 1) = 2.f;
  la.view(0, 0, 2) = ninf;
  lb.view(0, 0, 2) = ninf;
  merge_attention_states(oa.view, la.view, ob.view, lb.view, o.view, l.view);
  CHECK(o(0, 0, 0, 1) == 2.f);
  CHECK(l.view(0, 0, 0) == 0.5f);
  CHECK(o(0, 1, 0, 0) == -4.f);
  CHECK(l.view(0, 0, 1) == 2.f);
  CHECK(o(0, 2, 0, 0) == 0.f);
  CHECK(o(0, 2, 0, 1) == 0.f);
  CHECK(l.view(0, 0, 2) == ninf);
}

TEST_CASE("flash_attention and merge_attention_states validate input and write nothing on failure") {
  tensor4<float> q(1, 4, 4, 8), k(1, 6, 2, 8), v(1, 6, 2, 8), out(1, 4, 4, 8);
  test::fill_uniform(q, 1);
  test::fill_uniform(k, 2);
  test::fill_uniform(v, 3);
  const float sentinel = 777.f;
  std::fill(out.buf.begin(), out.buf.end(), sentinel);
  tensor4<float> k_bad(1, 6, 3, 8), v_bad(1, 6, 2, 9);
  test::require_error([&] { flash_attention(q.view, k_bad.view, v.view, out.view); }, {"flash_attention", "k", "dividing"});
  test::require_error([&] { flash_attention(q.view, k.view, v_bad.view, out.view); }, {"flash_attention", "out"});
  attention_params p;
  p.window_left = -3;
  test::require_error([&] { flash_attention(q.view, k.view, v.view, out.view, p); }, {"flash_attention", "params.window_left"});
  const index_t len = 7;
  p = {};
  p.kv_lengths = &len;
  test::require_error([&] { flash_attention(q.view, k.view, v.view, out.view, p); }, {"flash_attention", "params.kv_lengths[0]"});
  CHECK(test::untouched(out.buf, sentinel));

  tensor3<float> la(1, 4, 4), lb(1, 4, 4), lbad(1, 4, 5);
  tensor4<float> obad(1, 4, 4, 7);
  test::require_error([&] { merge_attention_states(out.view, la.view, obad.view, lb.view, out.view); },
                      {"merge_attention_states", "o_b"});
  test::require_error([&] { merge_attention_states(out.view, la.view, out.view, lbad.view, out.view); },
                      {"merge_attention_states", "lse_b", "(1, 4, 4)"});
  CHECK(test::untouched(out.buf, sentinel));
}
