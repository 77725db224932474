// reference_attention checked against cases computed by hand, and its input validation.
#include "test_util.hpp"

using namespace attnkit;
using test::tensor3;
using test::tensor4;

namespace {
const double inf = std::numeric_limits<double>::infinity();

// out for one (b, s, h) row as a vector.
template <class T>
std::vector<double> row(const tensor4<T>& t, index_t b, index_t s, index_t h) {
  std::vector<double> r;
  for (index_t d = 0; d < t.view.extent(3); ++d) r.push_back(convert<double>(t.view(b, s, h, d)));
  return r;
}
}  // namespace

TEST_CASE("two keys with logits (0, ln 2) weight the values 1/3 and 2/3") {
  tensor4<double> q(1, 1, 1, 1), k(1, 2, 1, 1), v(1, 2, 1, 1), out(1, 1, 1, 1);
  q(0, 0, 0, 0) = 1;
  k(0, 0, 0, 0) = 0;
  k(0, 1, 0, 0) = std::log(2.0);
  v(0, 0, 0, 0) = 3;
  v(0, 1, 0, 0) = 6;
  tensor3<double> lse(1, 1, 1);
  attention_params p;
  p.scale = 1.f;
  reference_attention(q.view, k.view, v.view, out.view, p, lse.view);
  CHECK(out(0, 0, 0, 0) == Approx(5.0).epsilon(1e-12));
  CHECK(lse.view(0, 0, 0) == Approx(std::log(3.0)).epsilon(1e-12));
}

TEST_CASE("identical keys give the mean of the values, default scale irrelevant") {
  const index_t Nk = 7, D = 5, Dv = 3;
  tensor4<float> q(1, 2, 1, D), k(1, Nk, 1, D), v(1, Nk, 1, Dv), out(1, 2, 1, Dv);
  test::fill_uniform(q, 1);
  test::fill_value(k, 0.5f);
  test::fill_uniform(v, 2);
  reference_attention(q.view, k.view, v.view, out.view);
  for (index_t i = 0; i < 2; ++i)
    for (index_t d = 0; d < Dv; ++d) {
      double mean = 0;
      for (index_t j = 0; j < Nk; ++j) mean += v(0, j, 0, d) / double(Nk);
      CHECK(out(0, i, 0, d) == Approx(mean).margin(1e-6));
    }
}

TEST_CASE("causal row 0 returns v0, causal with Nq < Nk is bottom-right aligned") {
  const index_t D = 4;
  tensor4<double> k(1, 5, 1, D), v(1, 5, 1, 2);
  test::fill_value(k, 1.f);  // identical keys: output = mean of the visible values
  test::fill_uniform(v, 3);
  attention_params p;
  p.causal = true;
  {
    tensor4<double> q(1, 5, 1, D), out(1, 5, 1, 2);
    test::fill_uniform(q, 4);
    reference_attention(q.view, k.view, v.view, out.view, p);
    CHECK(row(out, 0, 0, 0) == row(v, 0, 0, 0));
  }
  {
    tensor4<double> q(1, 2, 1, D), out(1, 2, 1, 2);  // query 0 sees keys 0..3, query 1 all five
    test::fill_uniform(q, 5);
    reference_attention(q.view, k.view, v.view, out.view, p);
    for (index_t d = 0; d < 2; ++d) {
      double m4 = 0, m5 = 0;
      for (index_t j = 0; j < 5; ++j) (j < 4 ? m4 : m5) += v(0, j, 0, d);
      m5 += m4;
      CHECK(out(0, 0, 0, d) == Approx(m4 / 4).epsilon(1e-12));
      CHECK(out(0, 1, 0, d) == Approx(m5 / 5).epsilon(1e-12));
    }
  }
}

TEST_CASE("a window of width 0 returns the diagonal value, out-of-range rows are fully masked") {
  tensor4<double> q(1, 4, 1, 3), k(1, 3, 1, 3), v(1, 3, 1, 2), out(1, 4, 1, 2);
  test::fill_uniform(q, 6);
  test::fill_uniform(k, 7);
  test::fill_uniform(v, 8);
  tensor3<double> lse(1, 1, 4);
  attention_params p;
  p.window_left = 0;
  p.window_right = 0;
  reference_attention(q.view, k.view, v.view, out.view, p, lse.view);
  // offset Nk - Nq = -1: query i sees only key i - 1; query 0 sees nothing.
  CHECK(row(out, 0, 0, 0) == std::vector<double>{0, 0});
  CHECK(lse.view(0, 0, 0) == -inf);
  for (index_t i = 1; i < 4; ++i) {
    CHECK(row(out, 0, i, 0) == row(v, 0, i - 1, 0));
    const double logit = [&] {
      double s = 0;
      for (index_t d = 0; d < 3; ++d) s += q(0, i, 0, d) * k(0, i - 1, 0, d);
      return s / std::sqrt(3.0);
    }();
    CHECK(lse.view(0, 0, i) == Approx(logit).epsilon(1e-12));
  }
}

TEST_CASE("a -inf bias column is ignored, a broadcast bias shifts nothing") {
  const index_t Nk = 6, D = 4;
  tensor4<double> q(2, 3, 2, D), k(2, Nk, 2, D), v(2, Nk, 2, D), out(2, 3, 2, D), ref(2, 3, 2, D);
  test::fill_uniform(q, 9);
  test::fill_uniform(k, 10);
  test::fill_uniform(v, 11);
  std::vector<float> col(Nk, 0.f);
  col[2] = -std::numeric_limits<float>::infinity();
  attention_params p;
  p.bias = tensor_view<const float, 4>(col.data(), {1, 1, 1, Nk}, {0, 0, 0, 1});
  reference_attention(q.view, k.view, v.view, out.view, p);
  // Same problem with key 2 removed.
  tensor4<double> k5(2, Nk - 1, 2, D), v5(2, Nk - 1, 2, D);
  for (index_t b = 0; b < 2; ++b)
    for (index_t j = 0, o = 0; j < Nk; ++j) {
      if (j == 2) continue;
      for (index_t h = 0; h < 2; ++h)
        for (index_t d = 0; d < D; ++d) {
          k5(b, o, h, d) = k(b, j, h, d);
          v5(b, o, h, d) = v(b, j, h, d);
        }
      ++o;
    }
  reference_attention(q.view, k5.view, v5.view, ref.view);
  CHECK(test::compare(out.view, ref.view).rel() < 1e-14);
  // A constant bias of 3 on every logit leaves the softmax unchanged and adds 3 to the lse.
  std::vector<float> three{3.f};
  p.bias = tensor_view<const float, 4>(three.data(), {1, 1, 1, 1}, {0, 0, 0, 0});
  tensor3<double> lse_b(2, 2, 3), lse_0(2, 2, 3);
  reference_attention(q.view, k.view, v.view, out.view, p, lse_b.view);
  reference_attention(q.view, k.view, v.view, ref.view, {}, lse_0.view);
  CHECK(test::compare(out.view, ref.view).rel() < 1e-14);
  for (std::size_t i = 0; i < lse_b.buf.size(); ++i) CHECK(lse_b.buf[i] == Approx(lse_0.buf[i] + 3).epsilon(1e-12));
}

TEST_CASE("grouped-query heads: query head h reads kv head h / (Hq / Hkv)") {
  const index_t Hq = 6, Hkv = 2, D = 3;
  tensor4<float> q(1, 2, Hq, D), k(1, 4, Hkv, D), v(1, 4, Hkv, 1), out(1, 2, Hq, 1);
  test::fill_uniform(q, 12);
  test::fill_value(k, 0.f);
  for (index_t j = 0; j < 4; ++j) {
    v(0, j, 0, 0) = 10.f + float(j);   // mean 11.5
    v(0, j, 1, 0) = -20.f - float(j);  // mean -21.5
  }
  reference_attention(q.view, k.view, v.view, out.view);
  for (index_t i = 0; i < 2; ++i)
    for (index_t h = 0; h < Hq; ++h) CHECK(out(0, i, h, 0) == Approx(h < 3 ? 11.5 : -21.5).epsilon(1e-6));
}

TEST_CASE("softcap and ALiBi follow their formulas") {
  tensor4<double> q(1, 2, 1, 1), k(1, 2, 1, 1), v(1, 2, 1, 1), out(1, 2, 1, 1);
  q(0, 0, 0, 0) = 2;
  q(0, 1, 0, 0) = -1;
  k(0, 0, 0, 0) = 3;
  k(0, 1, 0, 0) = 1;
  v(0, 0, 0, 0) = 1;
  v(0, 1, 0, 0) = 0;
  const float slope = 0.75f;
  attention_params p;
  p.scale = 1.f;
  p.softcap = 2.5f;
  p.alibi_slopes = &slope;
  reference_attention(q.view, k.view, v.view, out.view, p);
  auto cap = [](double x) { return 2.5 * std::tanh(x / 2.5); };
  // Query i, key j: logit cap(q_i k_j) - slope * |i - j| (Nq == Nk, offset 0); out = weight of key 0.
  for (index_t i = 0; i < 2; ++i) {
    const double s0 = cap(q(0, i, 0, 0) * 3) - slope * double(i), s1 = cap(q(0, i, 0, 0) * 1) - slope * double(1 - i);
    CHECK(out(0, i, 0, 0) == Approx(std::exp(s0) / (std::exp(s0) + std::exp(s1))).epsilon(1e-12));
  }
}

TEST_CASE("kv_lengths truncate each batch's keys and move the causal diagonal") {
  const index_t D = 4, Nk = 9, Nq = 3;
  tensor4<double> q(2, Nq, 1, D), k(2, Nk, 1, D), v(2, Nk, 1, D), out(2, Nq, 1, D);
  test::fill_uniform(q, 13);
  test::fill_uniform(k, 14);
  test::fill_uniform(v, 15);
  const index_t lens[2] = {5, 0};
  attention_params p;
  p.causal = true;
  p.kv_lengths = lens;
  tensor3<double> lse(2, 1, Nq);
  reference_attention(q.view, k.view, v.view, out.view, p, lse.view);
  // Batch 0 equals a call on the first 5 keys alone; batch 1 has no keys: zeros and -inf.
  tensor4<double> out0(1, Nq, 1, D);
  attention_params pc;
  pc.causal = true;
  reference_attention(q.view.slice(0, 0, 1), k.view.slice(0, 0, 1).slice(1, 0, 5),
                      v.view.slice(0, 0, 1).slice(1, 0, 5), out0.view, pc);
  CHECK(test::compare(out.view.slice(0, 0, 1), out0.view).max_abs == 0);
  for (index_t i = 0; i < Nq; ++i) {
    CHECK(lse.view(1, 0, i) == -inf);
    CHECK(row(out, 1, i, 0) == std::vector<double>(D, 0.0));
  }
}

TEST_CASE("memory order does not change the result, bf16 inputs equal their float values") {
  const index_t B = 2, Nq = 5, Nk = 7, H = 2, D = 6;
  for (auto l : {test::layout::bhsd, test::layout::padded, test::layout::strided}) {
    tensor4<float> q(B, Nq, H, D), k(B, Nk, H, D), v(B, Nk, H, D), out(B, Nq, H, D);
    tensor4<float> q2(B, Nq, H, D, l), k2(B, Nk, H, D, l), v2(B, Nk, H, D, l), out2(B, Nq, H, D, l);
    test::fill_uniform(q, 16);
    test::fill_uniform(k, 17);
    test::fill_uniform(v, 18);
    test::fill_uniform(q2, 16);
    test::fill_uniform(k2, 17);
    test::fill_uniform(v2, 18);
    reference_attention(q.view, k.view, v.view, out.view);
    reference_attention(q2.view, k2.view, v2.view, out2.view);
    INFO(test::layout_name(l));
    CHECK(test::compare(out2.view, out.view).max_abs == 0);
  }
  tensor4<bf16> qb(1, 3, 1, 4), kb(1, 3, 1, 4), vb(1, 3, 1, 4);
  test::fill_uniform(qb, 19);
  test::fill_uniform(kb, 20);
  test::fill_uniform(vb, 21);
  const auto qd = test::to_double(qb.view), kd = test::to_double(kb.view), vd = test::to_double(vb.view);
  tensor4<float> ob(1, 3, 1, 4);
  tensor4<double> od(1, 3, 1, 4);
  reference_attention(qb.view, kb.view, vb.view, ob.view);
  reference_attention(qd.view, kd.view, vd.view, od.view);
  CHECK(test::compare(ob.view, od.view).rel() < 1e-7);
}

TEST_CASE("empty sequences, NaN containment and huge logits") {
  tensor4<float> q(1, 3, 1, 2), k(1, 0, 1, 2), v(1, 0, 1, 2), out(1, 3, 1, 2);
  test::fill_uniform(q, 22);
  tensor3<float> lse(1, 1, 3);
  reference_attention(q.view, k.view, v.view, out.view, {}, lse.view);
  for (index_t i = 0; i < 3; ++i) CHECK(lse.view(0, 0, i) == -std::numeric_limits<float>::infinity());
  CHECK(out(0, 2, 0, 1) == 0.f);

  tensor4<float> k2(1, 4, 1, 2), v2(1, 4, 1, 2), out2(1, 3, 1, 2);
  test::fill_uniform(k2, 23);
  test::fill_uniform(v2, 24);
  q(0, 1, 0, 0) = std::numeric_limits<float>::quiet_NaN();
  reference_attention(q.view, k2.view, v2.view, out2.view);
  CHECK(std::isnan(out2(0, 1, 0, 0)));
  CHECK(std::isfinite(out2(0, 0, 0, 0)));
  CHECK(std::isfinite(out2(0, 2, 0, 1)));

  // Logits of +-1e4: softmax picks the largest logit exactly.
  tensor4<double> qh(1, 1, 1, 1), kh(1, 3, 1, 1), vh(1, 3, 1, 1), oh(1, 1, 1, 1);
  qh(0, 0, 0, 0) = 100;
  kh(0, 0, 0, 0) = -100;
  kh(0, 1, 0, 0) = 100;
  kh(0, 2, 0, 0) = 99;
  vh(0, 0, 0, 0) = 1;
  vh(0, 1, 0, 0) = 2;
  vh(0, 2, 0, 0) = 3;
  tensor3<double> lh(1, 1, 1);
  attention_params p;
  p.scale = 1.f;
  reference_attention(qh.view, kh.view, vh.view, oh.view, p, lh.view);
  const double w2 = std::exp(-100.0);  // weight ratio of key 2 to key 1
  CHECK(oh(0, 0, 0, 0) == Approx((2 + 3 * w2) / (1 + w2)).epsilon(1e-12));
  CHECK(lh.view(0, 0, 0) == Approx(1e4 + std::log1p(w2)).epsilon(1e-14));
}

// ---- validation: every check throws before anything is written -----------------------------------

TEST_CASE("reference_attention validates every argument and leaves out untouched") {
  const index_t B = 2, Nq = 3, Nk = 4, Hq = 4, Hkv = 2, D = 5;
  tensor4<float> q(B, Nq, Hq, D), k(B, Nk, Hkv, D), v(B, Nk, Hkv, D), out(B, Nq, Hq, D);
  test::fill_uniform(q, 1);
  test::fill_uniform(k, 2);
  test::fill_uniform(v, 3);
  const float sentinel = -12345.f;
  std::fill(out.buf.begin(), out.buf.end(), sentinel);
  tensor3<float> lse(B, Hq, Nq, sentinel);
  auto expect = [&](auto call, std::initializer_list<std::string> parts) {
    test::require_error(call, parts);
    CHECK(test::untouched(out.buf, sentinel));
    CHECK(test::untouched(lse.buf, sentinel));
  };
  tensor4<float> k_bad_batch(B + 1, Nk, Hkv, D), k_bad_d(B, Nk, Hkv, D + 1), k_bad_heads(B, Nk, 3, D);
  tensor4<float> v_bad(B, Nk + 1, Hkv, D), out_bad(B, Nq, Hq, D + 1);
  expect([&] { reference_attention(q.view, k_bad_batch.view, v.view, out.view); }, {"reference_attention", "k", "batch"});
  expect([&] { reference_attention(q.view, k_bad_d.view, v.view, out.view); }, {"k", "head_dim 5", "got 6"});
  expect([&] { reference_attention(q.view, k_bad_heads.view, v.view, out.view); }, {"k", "dividing", "got 3"});
  expect([&] { reference_attention(q.view, k.view, v_bad.view, out.view); }, {"v", "(2, 4, 2, 5)", "(2, 5, 2, 5)"});
  expect([&] { reference_attention(q.view, k.view, v.view, out_bad.view); }, {"out", "(2, 3, 4, 5)"});
  const tensor_view<float, 4> out_bcast(out.buf.data(), {B, Nq, Hq, D}, {0, Hq * D, D, 1});
  expect([&] { reference_attention(q.view, k.view, v.view, out_bcast); }, {"out", "stride 0", "axis 0"});
  tensor3<float> lse_bad(B, Hq, Nq + 1);
  expect([&] { reference_attention(q.view, k.view, v.view, out.view, {}, lse_bad.view); }, {"lse", "(batch, head, seq)"});

  attention_params p;
  p.scale = std::numeric_limits<float>::infinity();
  expect([&] { reference_attention(q.view, k.view, v.view, out.view, p); }, {"params.scale", "finite"});
  p = {};
  p.softcap = -1.f;
  expect([&] { reference_attention(q.view, k.view, v.view, out.view, p); }, {"params.softcap", "-1"});
  p = {};
  p.window_left = -2;
  expect([&] { reference_attention(q.view, k.view, v.view, out.view, p); }, {"params.window_left", "-2"});
  p = {};
  p.window_right = -5;
  expect([&] { reference_attention(q.view, k.view, v.view, out.view, p); }, {"params.window_right", "-5"});
  p = {};
  std::vector<float> bias(64, 0.f);
  p.bias = tensor_view<const float, 4>(bias.data(), {B, Hq, Nq, 2}, {0, 0, 0, 1});
  expect([&] { reference_attention(q.view, k.view, v.view, out.view, p); }, {"params.bias", "(2, 4, 3, 4)"});
  p = {};
  const float slopes[4] = {1.f, std::numeric_limits<float>::quiet_NaN(), 1.f, 1.f};
  p.alibi_slopes = slopes;
  expect([&] { reference_attention(q.view, k.view, v.view, out.view, p); }, {"params.alibi_slopes[1]"});
  p = {};
  const index_t lens[2] = {4, 5};
  p.kv_lengths = lens;
  expect([&] { reference_attention(q.view, k.view, v.view, out.view, p); }, {"params.kv_lengths[1]", "[0, 4]", "got 5"});
  const index_t neg[2] = {-1, 0};
  p.kv_lengths = neg;
  expect([&] { reference_attention(q.view, k.view, v.view, out.view, p); }, {"params.kv_lengths[0]", "got -1"});
}
