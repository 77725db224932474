// circular_attention (CAT) against reference_circular_attention (double), averaged_key_logits against
// a direct computation, and the input checks.
//
// Tolerances and the shared helpers: tests/circular_cases.hpp.
#include "circular_cases.hpp"

#include <cstring>

using namespace attnkit;
using test::tensor3;
using test::tensor4;

namespace {

constexpr double tol = test::circular_tol;
const float finf = std::numeric_limits<float>::infinity();
const float fnan = std::numeric_limits<float>::quiet_NaN();
using test::fill_logits;
using test::mode_name;
using test::mode_params;
using test::run_and_compare;

// The message of the attnkit::error that f throws ("" when it throws none).
template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const attnkit::error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("three tokens worked by hand: weights (1/4, 1/2, 1/4)") {
  tensor3<double> l(1, 1, 3);
  l.buf = {0.0, std::log(2.0), 0.0};
  tensor4<double> v(1, 3, 1, 1), out(1, 3, 1, 1);
  v(0, 0, 0, 0) = 1;
  v(0, 1, 0, 0) = 10;
  v(0, 2, 0, 0) = 100;
  // non-causal: out[i] = sum_j w[(i - j) mod 3] v[j]
  const double nc[3] = {0.25 * 1 + 0.25 * 10 + 0.5 * 100, 0.5 * 1 + 0.25 * 10 + 0.25 * 100,
                        0.25 * 1 + 0.5 * 10 + 0.25 * 100};
  // causal: out[i] = sum_{j <= i} w[i - j] v[j]; renormalized: divided by w[0] + ... + w[i]
  const double c[3] = {0.25, 0.5 + 2.5, 0.25 + 5 + 25};
  const double cs[3] = {0.25, 0.75, 1.0};
  for (int mode = 0; mode < 3; ++mode) {
    INFO(mode_name(mode));
    reference_circular_attention(l.view, v.view, out.view, mode_params(mode));
    for (index_t i = 0; i < 3; ++i) {
      const double want = mode == 0 ? nc[i] : mode == 1 ? c[i] : c[i] / cs[i];
      CHECK(out(0, i, 0, 0) == Approx(want).epsilon(1e-12));
    }
    tensor4<float> fast(1, 3, 1, 1);
    circular_attention(l.view, v.view, fast.view, mode_params(mode));
    for (index_t i = 0; i < 3; ++i) CHECK(fast(0, i, 0, 0) == Approx(out(0, i, 0, 0)).margin(100 * tol));  // |v| <= 100
  }
}

TEST_CASE("circular_attention matches the reference for N in {1, 2, 3, 7, 64, 100, 1000, 4096} and a prime") {
  struct shape {
    index_t N, B, H, D;
  };
  // D = 37 is not a multiple of the vector width; B * H = 6 heads share a group; big N keep the
  // O(N^2) reference affordable with fewer channels.
  const shape shapes[] = {{1, 2, 3, 37}, {2, 2, 3, 37}, {3, 2, 3, 37},  {7, 2, 3, 37},   {64, 2, 3, 37},
                          {100, 2, 3, 37}, {1000, 1, 2, 19}, {4096, 1, 2, 5}, {10007, 1, 1, 3}};
  for (const auto& s : shapes)
    for (int mode = 0; mode < 3; ++mode) {
      INFO("N = " << s.N << ", " << mode_name(mode));
      tensor3<float> l(s.B, s.H, s.N);
      fill_logits(l, 1 + s.N, 3.f);
      tensor4<float> v(s.B, s.N, s.H, s.D);
      test::fill_uniform(v, 2 + s.N);
      const auto e = run_and_compare(l.view, v.view, mode_params(mode));
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.max_abs <= tol);
    }
}

TEST_CASE("renormalize stays accurate where the global softmax weights of a prefix are tiny") {
  // Increasing logits put almost all mass on the last lags; spikes and a plateau give jumps of the
  // prefix mass: each drives a different branch of the renormalize recursion.
  const index_t N = 3000, D = 20;
  tensor4<float> v(1, N, 4, D);
  test::fill_uniform(v, 3);
  tensor3<float> l(1, 4, N);
  for (index_t j = 0; j < N; ++j) {
    l.view(0, 0, j) = 0.05f * float(j);            // steadily increasing
    l.view(0, 1, j) = 0.5f * float(j);             // steeply increasing (e^1500 range)
    l.view(0, 2, j) = j % 97 == 0 ? 30.f : 0.f;    // sparse spikes
    l.view(0, 3, j) = j < 2000 ? -40.f : 0.f;      // a late plateau
  }
  for (int mode = 0; mode < 3; ++mode) {
    INFO(mode_name(mode));
    const auto e = run_and_compare(l.view, v.view, mode_params(mode));
    CHECK_FALSE(e.mismatched_nonfinite);
    CHECK(e.max_abs <= tol);
  }
}

TEST_CASE("logits of +-1e4 pick single lags exactly") {
  for (index_t N : {7, 100, 1000}) {
    tensor3<float> l(2, 2, N);
    fill_logits(l, 4, 1e4f);
    tensor4<float> v(2, N, 2, 9);
    test::fill_uniform(v, 5);
    for (int mode = 0; mode < 3; ++mode) {
      INFO("N = " << N << ", " << mode_name(mode));
      const auto e = run_and_compare(l.view, v.view, mode_params(mode));
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.max_abs <= tol);
    }
  }
}

TEST_CASE("memory order does not change a single bit") {
  const index_t B = 2, N = 100, H = 3, D = 37;
  tensor3<float> l(B, H, N);
  fill_logits(l, 6, 2.f);
  // The same logits in (batch, seq, head) memory order with a gap after every position.
  std::vector<float> lbsh(static_cast<std::size_t>(B * N * (H + 1)), fnan);
  const tensor_view<float, 3> lv(lbsh.data(), {B, H, N}, {N * (H + 1), 1, H + 1});
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t j = 0; j < N; ++j) lv(b, h, j) = l.view(b, h, j);
  tensor4<float> v(B, N, H, D), out(B, N, H, D);
  test::fill_uniform(v, 7);
  for (int mode = 0; mode < 3; ++mode) {
    circular_attention(l.view, v.view, out.view, mode_params(mode));
    for (auto lay : {test::layout::bhsd, test::layout::padded, test::layout::strided}) {
      INFO(mode_name(mode) << ", " << test::layout_name(lay));
      tensor4<float> v2(B, N, H, D, lay), out2(B, N, H, D, lay);
      test::fill_uniform(v2, 7);
      circular_attention(lv, v2.view, out2.view, mode_params(mode));
      const auto e = test::compare(out2.view, out.view);
      CHECK(e.max_abs == 0);
      CHECK_FALSE(e.mismatched_nonfinite);
    }
  }
}

TEST_CASE("bf16, f16 and double inputs, double output") {
  const index_t B = 2, N = 1000, H = 2, D = 21;
  for (int mode = 0; mode < 3; ++mode) {
    INFO(mode_name(mode));
    {
      tensor3<bf16> l(B, H, N);
      fill_logits(l, 8, 3.f);
      tensor4<bf16> v(B, N, H, D);
      test::fill_uniform(v, 9);
      const auto e = run_and_compare(l.view, v.view, mode_params(mode));
      CHECK(e.max_abs <= tol);
    }
    {
      tensor3<f16> l(B, H, N);
      fill_logits(l, 10, 3.f);
      tensor4<f16> v(B, N, H, D, test::layout::strided);
      test::fill_uniform(v, 11);
      const auto e = run_and_compare(l.view, v.view, mode_params(mode));
      CHECK(e.max_abs <= tol);
    }
    {
      // double inputs are rounded to float: compare with the reference on the double values, the
      // rounding adds about 1e-7 relative.
      tensor3<double> l(B, H, N);
      fill_logits(l, 12, 3.f);
      for (auto& x : l.buf) x += 1e-9;  // not representable in float
      tensor4<double> v(B, N, H, D), out(B, N, H, D), ref(B, N, H, D);
      test::fill_uniform(v, 13);
      circular_attention(l.view, v.view, out.view, mode_params(mode));
      reference_circular_attention(l.view, v.view, ref.view, mode_params(mode));
      CHECK(test::compare(out.view, ref.view).max_abs <= tol);
    }
  }
}

TEST_CASE("bitwise identical for 1 and 2 threads") {
#if defined(_OPENMP)
  // 2 * simd::width + 3 heads: several head groups and a partial one.
  const index_t B = 1, H = 2 * simd::width + 3, D = 37;
  for (index_t N : {1000, 4096}) {
    tensor3<float> l(B, H, N);
    fill_logits(l, 14, 3.f);
    tensor4<float> v(B, N, H, D), o1(B, N, H, D), o2(B, N, H, D);
    test::fill_uniform(v, 15);
    for (int mode = 0; mode < 3; ++mode) {
      INFO("N = " << N << ", " << mode_name(mode));
      const int saved = omp_get_max_threads();
      omp_set_num_threads(1);
      circular_attention(l.view, v.view, o1.view, mode_params(mode));
      omp_set_num_threads(2);
      circular_attention(l.view, v.view, o2.view, mode_params(mode));
      omp_set_num_threads(saved);
      CHECK(std::memcmp(o1.buf.data(), o2.buf.data(), o1.buf.size() * sizeof(float)) == 0);
    }
  }
#else
  WARN("built without OpenMP: nothing to compare");
#endif
}

TEST_CASE("logits of -inf are legal, NaN spreads only to the rows it reaches") {
  const index_t N = 200, H = 3, D = 5;
  tensor3<float> l(1, H, N);
  fill_logits(l, 16, 2.f);
  for (index_t j = 0; j < N; j += 3) l.view(0, 0, j) = -finf;  // head 0: a third masked
  for (index_t j = 0; j < N; ++j) l.view(0, 1, j) = -finf;      // head 1: everything masked
  l.view(0, 2, 150) = fnan;                                      // head 2: one NaN logit
  tensor4<float> v(1, N, H, D);
  test::fill_uniform(v, 17);
  v(0, 40, 0, 3) = fnan;  // a NaN value in head 0, channel 3
  for (int mode = 0; mode < 3; ++mode) {
    INFO(mode_name(mode));
    tensor4<float> out(1, N, H, D);
    tensor4<double> ref(1, N, H, D);
    circular_attention(l.view, v.view, out.view, mode_params(mode));
    reference_circular_attention(l.view, v.view, ref.view, mode_params(mode));
    const auto e = test::compare(out.view, ref.view);
    CHECK_FALSE(e.mismatched_nonfinite);
    CHECK(e.max_abs <= tol);
    // Head 1 is all zeros; head 0 channel 3 is NaN from row 40 (causal) or everywhere; other
    // channels stay finite.
    CHECK(out(0, 7, 1, 2) == 0.f);
    CHECK(std::isnan(out(0, 40, 0, 3)));
    CHECK(std::isnan(out(0, 39, 0, 3)) == (mode == 0));
    CHECK(std::isfinite(out(0, 100, 0, 2)));
    // Head 2: NaN everywhere, except rows before the NaN logit under renormalize.
    CHECK(std::isnan(out(0, 150, 2, 0)));
    CHECK(std::isnan(out(0, 149, 2, 0)) == (mode != 2));
  }
}

TEST_CASE("causal+renormalize: a NaN value poisons rows from its position on, except rows whose prefix is all -inf") {
  // Rows whose logits prefix is all -inf are 0 by definition; later rows reach the NaN also through
  // lags of weight 0 (0 * NaN). Found by test_differential: the direct sums poisoned the all -inf
  // prefix, and a piece skipped for having no weight hid the NaN from the rows after it.
  struct scenario {
    index_t N, masked, nan_at;  // logits [0, masked) are -inf, v[nan_at] channel 1 is NaN
  };
  for (const scenario sc : {scenario{20, 20, 6}, scenario{71, 43, 5}, scenario{143, 125, 93}, scenario{223, 164, 170}}) {
    INFO("N = " << sc.N << ", -inf logits [0, " << sc.masked << "), NaN value at " << sc.nan_at);
    tensor3<float> l(1, 1, sc.N);
    fill_logits(l, 50, 3.f);
    for (index_t j = 0; j < sc.masked; ++j) l.view(0, 0, j) = -finf;
    tensor4<float> v(1, sc.N, 1, 2), out(1, sc.N, 1, 2);
    test::fill_uniform(v, 51);
    v(0, sc.nan_at, 0, 1) = fnan;
    const auto e = run_and_compare(l.view, v.view, mode_params(2));
    CHECK_FALSE(e.mismatched_nonfinite);
    CHECK(e.max_abs <= tol);
    circular_attention(l.view, v.view, out.view, mode_params(2));
    for (index_t i = 0; i < sc.N; ++i) {
      INFO("row " << i);
      CHECK(std::isnan(out(0, i, 0, 1)) == (i >= std::max(sc.masked, sc.nan_at)));
      CHECK(std::isfinite(out(0, i, 0, 0)));
    }
  }
}

TEST_CASE("empty extents are a no-op") {
  tensor3<float> l0(2, 3, 0);
  tensor4<float> v0(2, 0, 3, 4), o0(2, 0, 3, 4);
  circular_attention(l0.view, v0.view, o0.view);
  tensor3<float> l(2, 3, 5);
  fill_logits(l, 1, 1.f);
  tensor4<float> v(2, 5, 3, 0), o(2, 5, 3, 0);
  circular_attention(l.view, v.view, o.view);
  reference_circular_attention(l.view, v.view, o.view);
  SUCCEED();
}

// ---- averaged_key_logits ----------------------------------------------------------------------------

TEST_CASE("averaged_key_logits equals q . mean(k) with grouped heads, layouts and dtypes") {
  const index_t B = 2, Nq = 33, Nk = 47, Hq = 6, Hkv = 2, D = 37;
  auto direct = [&](const auto& q, const auto& k, double scale) {
    tensor3<double> r(B, Hq, Nq);
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < Hq; ++h)
        for (index_t i = 0; i < Nq; ++i) {
          double s = 0;
          for (index_t d = 0; d < D; ++d) {
            double kbar = 0;
            for (index_t j = 0; j < Nk; ++j) kbar += convert<double>(k(b, j, h / (Hq / Hkv), d));
            s += convert<double>(q(b, i, h, d)) * kbar / double(Nk);
          }
          r.view(b, h, i) = scale * s;
        }
    return r;
  };
  for (auto lay : {test::layout::bshd, test::layout::bhsd, test::layout::strided}) {
    INFO(test::layout_name(lay));
    tensor4<float> q(B, Nq, Hq, D, lay), k(B, Nk, Hkv, D, lay);
    test::fill_uniform(q, 20);
    test::fill_uniform(k, 21);
    tensor3<float> got(B, Hq, Nq);
    averaged_key_logits(q.view, k.view, got.view);
    const auto want = direct(q.view, k.view, 1.0 / std::sqrt(double(D)));
    CHECK(test::compare(got.view, want.view).max_abs <= 1e-6);
    averaged_key_logits(q.view, k.view, got.view, 2.5f);
    CHECK(test::compare(got.view, direct(q.view, k.view, 2.5).view).max_abs <= 2e-6);
  }
  tensor4<bf16> qb(B, Nq, Hq, D), kb(B, Nk, Hkv, D);
  test::fill_uniform(qb, 22);
  test::fill_uniform(kb, 23);
  tensor3<double> gotd(B, Hq, Nq);
  averaged_key_logits(qb.view, kb.view, gotd.view, 1.f);
  CHECK(test::compare(gotd.view, direct(qb.view, kb.view, 1.0).view).max_abs <= 2e-6);
  tensor4<double> qd(B, Nq, Hq, D), kd(B, Nk, Hkv, D);
  test::fill_uniform(qd, 24);
  test::fill_uniform(kd, 25);
  averaged_key_logits(qd.view, kd.view, gotd.view, 1.f);
  CHECK(test::compare(gotd.view, direct(qd.view, kd.view, 1.0).view).max_abs <= 1e-12);
}

TEST_CASE("averaged_key_logits feeds circular_attention (CAT's averaged-key variant)") {
  const index_t B = 1, N = 64, H = 4, D = 16;
  tensor4<float> q(B, N, H, D), k(B, N, H, D), v(B, N, H, D), out(B, N, H, D);
  test::fill_uniform(q, 26);
  test::fill_uniform(k, 27);
  test::fill_uniform(v, 28);
  tensor3<float> logits(B, H, N);
  averaged_key_logits(q.view, k.view, logits.view);
  const auto e = run_and_compare(logits.view, v.view, circular_params{});
  CHECK(e.max_abs <= tol);
}

// ---- validation: every check throws before anything is written ---------------------------------------

TEST_CASE("circular_attention and the reference validate every argument and leave out untouched") {
  const index_t B = 2, N = 5, H = 3, D = 4;
  tensor3<float> l(B, H, N);
  fill_logits(l, 30, 1.f);
  tensor4<float> v(B, N, H, D), out(B, N, H, D);
  test::fill_uniform(v, 31);
  const float sentinel = -12345.f;
  std::fill(out.buf.begin(), out.buf.end(), sentinel);
  tensor4<double> outd(B, N, H, D);
  std::fill(outd.buf.begin(), outd.buf.end(), double(sentinel));
  // Both operators must throw attnkit::error naming themselves and every part, before writing.
  auto expect = [&](const auto& lv, const auto& vv, const auto& ov, const auto& odv,
                    std::initializer_list<std::string> parts) {
    const std::string fast = error_message([&] { circular_attention(lv, vv, ov); });
    const std::string ref = error_message([&] { reference_circular_attention(lv, vv, odv); });
    INFO("circular_attention: " << fast << "\nreference: " << ref);
    CHECK(fast.rfind("circular_attention: ", 0) == 0);
    CHECK(ref.rfind("reference_circular_attention: ", 0) == 0);
    for (const auto& part : parts) {
      CHECK(fast.find(part) != std::string::npos);
      CHECK(ref.find(part) != std::string::npos);
    }
    CHECK(test::untouched(out.buf, sentinel));
    CHECK(test::untouched(outd.buf, double(sentinel)));
  };
  tensor4<float> v_batch(B + 1, N, H, D), v_seq(B, N + 1, H, D), v_heads(B, N, H + 1, D);
  expect(l.view, v_batch.view, out.view, outd.view, {"v", "batch extent 2 (as logits)", "got 3"});
  expect(l.view, v_seq.view, out.view, outd.view, {"v", "sequence length 5 (as logits)", "got 6"});
  expect(l.view, v_heads.view, out.view, outd.view, {"v", "head count 3 (as logits)", "got 4"});
  tensor4<float> o_bad(B, N, H, D + 1);
  tensor4<double> od_bad(B, N, H, D + 1);
  expect(l.view, v.view, o_bad.view, od_bad.view, {"out", "(batch, seq, head, dim) = (2, 5, 3, 4)", "(2, 5, 3, 5)"});
  tensor4<float> o_seq(B, N - 1, H, D);
  tensor4<double> od_seq(B, N - 1, H, D);
  expect(l.view, v.view, o_seq.view, od_seq.view, {"out", "(2, 5, 3, 4)", "(2, 4, 3, 4)"});
  // An output with a broadcast (stride 0) axis.
  const tensor_view<float, 4> o_bcast(out.buf.data(), {B, N, H, D}, {0, H * D, D, 1});
  const tensor_view<double, 4> od_bcast(outd.buf.data(), {B, N, H, D}, {0, H * D, D, 1});
  expect(l.view, v.view, o_bcast, od_bcast, {"out", "a non-zero stride on axis 0 (extent 2; outputs cannot broadcast)", "got stride 0"});
  // A sequence too long for the transform: stride-0 views make it without memory.
  const index_t huge = (index_t(1) << 40) + 1;
  float one = 1.f;
  const tensor_view<float, 3> lh(&one, {1, 1, huge}, {0, 0, 0});
  const tensor_view<float, 4> vh(&one, {1, huge, 1, 1}, {0, 0, 0, 0});
  const tensor_view<float, 4> oh(out.buf.data(), {1, huge, 1, 1}, {0, 0, 0, 0});
  const tensor_view<double, 4> ohd(outd.buf.data(), {1, huge, 1, 1}, {0, 0, 0, 0});
  expect(lh, vh, oh, ohd, {"logits", "a sequence length <= 2^40"});
}

TEST_CASE("averaged_key_logits validates every argument and leaves logits untouched") {
  const index_t B = 2, Nq = 3, Nk = 4, Hq = 4, Hkv = 2, D = 5;
  tensor4<float> q(B, Nq, Hq, D), k(B, Nk, Hkv, D);
  test::fill_uniform(q, 40);
  test::fill_uniform(k, 41);
  const float sentinel = -777.f;
  tensor3<float> logits(B, Hq, Nq, sentinel);
  auto expect = [&](auto call, std::initializer_list<std::string> parts) {
    test::require_error(call, parts);
    CHECK(test::untouched(logits.buf, sentinel));
  };
  tensor4<float> k_batch(B + 1, Nk, Hkv, D), k_dim(B, Nk, Hkv, D + 1), k_heads(B, Nk, 3, D), k_none(B, Nk, 0, D);
  tensor4<float> k_empty(B, 0, Hkv, D);
  expect([&] { averaged_key_logits(q.view, k_batch.view, logits.view); }, {"averaged_key_logits", "k", "batch extent 2 (as q)", "got 3"});
  expect([&] { averaged_key_logits(q.view, k_dim.view, logits.view); }, {"k", "head_dim 5 (as q)", "got 6"});
  expect([&] { averaged_key_logits(q.view, k_heads.view, logits.view); }, {"k", "dividing the query head count 4", "got 3"});
  expect([&] { averaged_key_logits(q.view, k_none.view, logits.view); }, {"k", "at least one kv head", "got 0"});
  expect([&] { averaged_key_logits(q.view, k_empty.view, logits.view); }, {"k", "at least one key", "got 0"});
  tensor3<float> l_bad(B, Hq, Nq + 1);
  expect([&] { averaged_key_logits(q.view, k.view, l_bad.view); }, {"logits", "(batch, head, seq) = (2, 4, 3)", "(2, 4, 4)"});
  const tensor_view<float, 3> l_bcast(logits.buf.data(), {B, Hq, Nq}, {Hq * Nq, Nq, 0});
  expect([&] { averaged_key_logits(q.view, k.view, l_bcast); }, {"logits", "a non-zero stride on axis 2", "got stride 0"});
  expect([&] { averaged_key_logits(q.view, k.view, logits.view, finf); }, {"scale", "finite", "inf"});
  expect([&] { averaged_key_logits(q.view, k.view, logits.view, fnan); }, {"scale", "finite", "nan"});
}
