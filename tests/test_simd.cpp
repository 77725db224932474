// The SIMD layer against scalar code: exp, conversions, tails, reductions.
#include "test_util.hpp"

using namespace attnkit;

TEST_CASE("simd::exp matches std::exp over the softmax range, including -inf") {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> xs{-inf, -1000.f, -103.f, -100.f, -87.3f, -20.f, -1.5f, -1e-7f, 0.f, 1e-7f, 0.5f, 1.f, 10.f, 88.f, 88.3f};
  for (int i = -2000; i <= 2006; ++i) xs.push_back(static_cast<float>(i) * 0.044f);
  while (xs.size() % static_cast<std::size_t>(simd::width) != 0) xs.push_back(0.f);
  for (std::size_t i = 0; i < xs.size(); i += static_cast<std::size_t>(simd::width)) {
    std::vector<float> got(static_cast<std::size_t>(simd::width));
    simd::store(got.data(), simd::exp(simd::load(xs.data() + i)));
    for (std::size_t l = 0; l < got.size(); ++l) {
      const double want = std::exp(static_cast<double>(xs[i + l]));
      INFO("x = " << xs[i + l]);
      if (want < 1e-37) {
        CHECK(std::abs(double(got[l]) - want) <= 1e-38);  // near or below the smallest normal float
      } else {
        CHECK(std::abs(got[l] - want) <= 4e-7 * want);
      }
    }
  }
}

TEST_CASE("simd::exp overflows to +inf above the float range") {
  std::vector<float> big(static_cast<std::size_t>(simd::width), 89.f);
  CHECK(simd::hmax(simd::exp(simd::load(big.data()))) == std::numeric_limits<float>::infinity());
}

TEST_CASE("simd::exp_fast is within 2 ulp of exp up to 88.3, with exp's special values") {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> xs{-inf, -1000.f, -103.f, -100.f, -87.3f, -1e-30f, -0.f, 0.f, 1e-30f, 88.3f};
  for (int i = -104000; i <= 88300; ++i) xs.push_back(static_cast<float>(i) * 1e-3f + 3e-7f * static_cast<float>(i % 7));
  while (xs.size() % static_cast<std::size_t>(simd::width) != 0) xs.push_back(0.f);
  std::vector<float> got(static_cast<std::size_t>(simd::width));
  for (std::size_t i = 0; i < xs.size(); i += static_cast<std::size_t>(simd::width)) {
    simd::store(got.data(), simd::exp_fast(simd::load(xs.data() + i)));
    for (std::size_t l = 0; l < got.size(); ++l) {
      const double want = std::exp(static_cast<double>(xs[i + l]));
      INFO("x = " << xs[i + l]);
      if (want < 1.2e-38) {
        CHECK(std::abs(double(got[l]) - want) <= 1e-38);  // near or below the smallest normal float
      } else {
        CHECK(std::abs(double(got[l]) - want) <= 2 * std::ldexp(1.0, std::ilogb(want) - 23));
      }
    }
  }
  std::vector<float> special(static_cast<std::size_t>(simd::width), nan);
  special[1] = 89.f;
  special[2] = inf;
  simd::store(got.data(), simd::exp_fast(simd::load(special.data())));
  CHECK(std::isnan(got[0]));
  CHECK(got[1] == inf);
  CHECK(got[2] == inf);
  // Exactly 0 for -inf: elu + 1 of -inf is 0, and a caller summing exp of masked (-inf) values
  // must get exactly 0.
  std::vector<float> minus_inf(static_cast<std::size_t>(simd::width), -inf);
  simd::store(got.data(), simd::exp_fast(simd::load(minus_inf.data())));
  for (float g : got) CHECK(g == 0.f);
}

TEST_CASE("bf16 and f16 vector loads equal scalar conversion") {
  const index_t n = 3 * simd::width;
  std::vector<bf16> b(static_cast<std::size_t>(n));
  std::vector<f16> h(static_cast<std::size_t>(n));
  auto g = test::rng(1);
  std::uniform_real_distribution<float> u(-300.f, 300.f);
  for (index_t i = 0; i < n; ++i) {
    b[i] = bf16(u(g));
    h[i] = f16(u(g) / 8.f);
  }
  b[0] = bf16(std::numeric_limits<float>::infinity());
  h[1] = f16(-std::numeric_limits<float>::infinity());
  std::vector<float> fb(static_cast<std::size_t>(n)), fh(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; i += simd::width) {
    simd::store(fb.data() + i, simd::load(b.data() + i));
    simd::store(fh.data() + i, simd::load(h.data() + i));
  }
  for (index_t i = 0; i < n; ++i) {
    CHECK(fb[i] == static_cast<float>(b[i]));
    CHECK(fh[i] == static_cast<float>(h[i]));
  }
  // convert_row handles every length, including ones below the vector width.
  for (index_t len : {index_t(0), index_t(1), simd::width - 1, simd::width + 3, n}) {
    std::vector<float> dst(static_cast<std::size_t>(n) + 1, -7.f);
    simd::convert_row(dst.data(), h.data(), len);
    for (index_t i = 0; i < len; ++i) CHECK(dst[i] == static_cast<float>(h[i]));
    CHECK(dst[len] == -7.f);
  }
}

TEST_CASE("tails, reductions, dot, axpy and max_of handle lengths below and above the width") {
  for (index_t n : {index_t(1), index_t(3), simd::width, simd::width + 1, 5 * simd::width - 1}) {
    std::vector<float> a(static_cast<std::size_t>(n)), b(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) {
      a[i] = 0.25f * static_cast<float>(i % 7) - 0.5f;
      b[i] = 1.f + 0.125f * static_cast<float>(i % 5);
    }
    double want_dot = 0;
    float want_max = -std::numeric_limits<float>::infinity();
    for (index_t i = 0; i < n; ++i) {
      want_dot += double(a[i]) * b[i];
      want_max = std::max(want_max, a[i]);
    }
    CHECK(simd::dot(a.data(), b.data(), n) == Approx(want_dot).margin(1e-5));
    CHECK(simd::max_of(a.data(), n) == want_max);
    std::vector<float> y = b;
    simd::axpy(y.data(), 2.f, a.data(), n);
    for (index_t i = 0; i < n; ++i) CHECK(y[i] == b[i] + 2.f * a[i]);
    simd::scale(y.data(), 0.5f, n);
    for (index_t i = 0; i < n; ++i) CHECK(y[i] == 0.5f * (b[i] + 2.f * a[i]));
  }
  const auto t = simd::load_tail(std::vector<float>{1.f, 2.f}.data(), 2, -5.f);
  CHECK(simd::hmax(t) == 2.f);
  CHECK(simd::hsum(t) == Approx(3.f - 5.f * static_cast<float>(simd::width - 2)));
  CHECK(simd::max_of(nullptr, 0) == -std::numeric_limits<float>::infinity());
}

TEST_CASE("transpose moves lane j of row i to lane i of row j") {
  simd::vec rows[simd::width];
  for (index_t i = 0; i < simd::width; ++i) {
    alignas(64) float t[simd::width];
    for (index_t j = 0; j < simd::width; ++j) t[j] = float(i * 100 + j);
    rows[i] = simd::vec::load_aligned(t);
  }
  simd::transpose(rows);
  for (index_t j = 0; j < simd::width; ++j) {
    alignas(64) float t[simd::width];
    rows[j].store_aligned(t);
    for (index_t i = 0; i < simd::width; ++i) CHECK(t[i] == float(i * 100 + j));
  }
}

TEST_CASE("hsum_rows puts the sum of row j in lane j") {
  simd::vec rows[simd::width];
  for (index_t j = 0; j < simd::width; ++j) {
    alignas(64) float t[simd::width];
    for (index_t l = 0; l < simd::width; ++l) t[l] = float(j * 1000 + l * l);
    rows[j] = simd::vec::load_aligned(t);
  }
  alignas(64) float out[simd::width];
  simd::hsum_rows(rows).store_aligned(out);
  for (index_t j = 0; j < simd::width; ++j) {
    float want = 0;
    for (index_t l = 0; l < simd::width; ++l) want += float(j * 1000 + l * l);
    CHECK(out[j] == want);
  }
}
