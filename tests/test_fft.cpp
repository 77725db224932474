// kernels/fft.hpp: sizes, plans, complex and real transforms against Eigen's FFT (in double), round
// trips, convolution against a direct sum, and the plan cache.
#include "test_util.hpp"

#include <attnkit/kernels/fft.hpp>

#include <unsupported/Eigen/FFT>

#include <complex>
#include <cstring>
#include <memory>

using namespace attnkit;
using cd = std::complex<double>;

namespace {

std::vector<float> random_floats(std::size_t n, std::uint64_t seed) {
  auto g = test::rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> r(n);
  for (auto& x : r) x = u(g);
  return r;
}

// DFT of a real or complex sequence through Eigen (kissfft in double); a direct sum for n == 1,
// which Eigen's kissfft does not handle.
std::vector<cd> eigen_dft(const std::vector<cd>& x) {
  if (x.size() == 1) return x;
  Eigen::FFT<double> fft;
  std::vector<cd> X;
  fft.fwd(X, x);
  return X;
}

// max |a - b| / max |b|; infinite when a holds a NaN or an infinity (b is finite in these tests).
double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return std::numeric_limits<double>::infinity();
    d = std::max(d, double(std::abs(a[i] - b[i])));
    m = std::max(m, double(std::abs(b[i])));
  }
  return d / std::max(m, 1e-30);
}

// Lengths covering every radix, mixed factorizations, and the cache-blocked depth-first path
// (n * fft_elem floats above kernels::fft_block_bytes).
const index_t lengths[] = {1, 2, 3, 4, 5, 6, 8, 9, 12, 15, 16, 25, 30, 60, 64, 100, 120, 128, 1000, 1024, 4096, 6000, 19200, 65536};

}  // namespace

TEST_CASE("fft_good_size: the smallest 2^a 3^b 5^c at or above n") {
  CHECK(kernels::fft_good_size(0) == 1);
  CHECK(kernels::fft_good_size(1) == 1);
  CHECK(kernels::fft_good_size(7) == 8);
  CHECK(kernels::fft_good_size(11) == 12);
  CHECK(kernels::fft_good_size(13) == 15);
  CHECK(kernels::fft_good_size(2 * 4099 - 1) == 8640);  // 2^6 3^3 5
  CHECK(kernels::fft_good_size(2 * 4096 - 1) == 8192);
  CHECK(kernels::fft_good_size(2 * 1000 - 1) == 2000);
  CHECK(kernels::fft_good_size(1025) == 1080);
  for (index_t n = 1; n < 3000; ++n) {
    const index_t g = kernels::fft_good_size(n);
    REQUIRE(g >= n);
    REQUIRE(kernels::fft_is_good_size(g));
    for (index_t m = n; m < g; ++m) REQUIRE_FALSE(kernels::fft_is_good_size(m));
  }
  CHECK_FALSE(kernels::fft_is_good_size(0));
  CHECK_FALSE(kernels::fft_is_good_size(7 * 4));
}

TEST_CASE("the block-recursive path is exercised by the largest test length") {
  CHECK(65536 * kernels::fft_elem * index_t(sizeof(float)) > kernels::fft_block_bytes);
}

TEST_CASE("fft_forward matches Eigen's complex FFT, fft_inverse undoes it (n times)") {
  constexpr index_t W = simd::width, E = kernels::fft_elem;
  for (index_t n : lengths) {
    INFO("n = " << n);
    const auto plan = kernels::get_fft_plan(n);
    REQUIRE(plan->size() == n);
    const auto x = random_floats(static_cast<std::size_t>(n * E), 100 + n);
    std::vector<float> buf = x;
    kernels::fft_forward(*plan, buf.data());
    double err = 0, ref = 0;
    for (index_t lane : {index_t(0), W - 1}) {
      std::vector<cd> xs(static_cast<std::size_t>(n));
      for (index_t m = 0; m < n; ++m) xs[m] = {x[m * E + lane], x[m * E + W + lane]};
      const auto X = eigen_dft(xs);
      for (index_t k = 0; k < n; ++k) {
        const index_t pos = plan->position_of(k);
        const cd got(buf[pos * E + lane], buf[pos * E + W + lane]);
        err = std::max(err, std::abs(got - X[k]));
        ref = std::max(ref, std::abs(X[k]));
      }
    }
    CHECK(err <= 1e-6 * ref);
    kernels::fft_inverse(*plan, buf.data());
    double rt = 0;
    for (std::size_t i = 0; i < buf.size(); ++i) rt = std::max(rt, std::abs(buf[i] / double(n) - x[i]));
    CHECK(rt <= 2e-6);
  }
}

// The same arithmetic in a different code path: equal up to the compiler's choices of where to fuse a
// multiply and an add (GCC's default -ffp-contract=fast decides per inlined copy), so not bit for bit.
TEST_CASE("a fused two-stage pass equals the two stages run one after the other") {
  // Lengths whose first two stages cover every radix pair a plan can produce (5s, 3s, 4s, then a 2).
  for (index_t n : {5 * 5 * 8, 5 * 3 * 8, 5 * 4 * 4, 5 * 2, 3 * 3 * 4, 3 * 4 * 4, 3 * 2, 4 * 4 * 4, 4 * 2}) {
    INFO("n = " << n);
    const auto plan = kernels::get_fft_plan(n);
    const auto& st = plan->stages();
    REQUIRE(st.size() >= 2);
    const auto x = random_floats(static_cast<std::size_t>(n * kernels::fft_elem), 300 + n);
    for (bool fwd : {true, false}) {
      std::vector<float> a = x, b = x;
      if (fwd) {
        kernels::detail::fused_pass<true>(st[0], st[1], a.data());
        kernels::detail::run_stage<true>(st[0], b.data(), 1);
        kernels::detail::run_stage<true>(st[1], b.data(), st[0].radix);
      } else {
        kernels::detail::fused_pass<false>(st[0], st[1], a.data());
        kernels::detail::run_stage<false>(st[1], b.data(), st[0].radix);
        kernels::detail::run_stage<false>(st[0], b.data(), 1);
      }
      CHECK(max_rel_diff(a, b) <= 1e-6);
    }
  }
}

TEST_CASE("position_of is a permutation") {
  for (index_t n : {1, 12, 60, 1000, 6000}) {
    const auto plan = kernels::get_fft_plan(n);
    std::vector<int> seen(static_cast<std::size_t>(n), 0);
    for (index_t k = 0; k < n; ++k) ++seen[static_cast<std::size_t>(plan->position_of(k))];
    CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
  }
}

TEST_CASE("rfft matches Eigen's real FFT in FFTW's batch layout, any channel count and row stride") {
  for (index_t n : lengths) {
    for (index_t C : {index_t(1), index_t(37), 2 * simd::width + 3}) {
      INFO("n = " << n << ", channels = " << C);
      const index_t ldx = C + 3, ldX = C + 1;  // rows wider than the channel count
      const auto plan = kernels::get_fft_plan(n);
      const auto x = random_floats(static_cast<std::size_t>(n * ldx), 7 * n + C);
      const std::complex<float> sentinel(-7.f, -7.f);
      std::vector<std::complex<float>> X(static_cast<std::size_t>((n / 2 + 1) * ldX), sentinel);
      kernels::rfft(*plan, x.data(), ldx, C, X.data(), ldX);
      double err = 0, ref = 0;
      for (index_t c = 0; c < C; ++c) {
        std::vector<cd> xs(static_cast<std::size_t>(n));
        for (index_t m = 0; m < n; ++m) xs[m] = x[m * ldx + c];
        const auto Xd = eigen_dft(xs);
        for (index_t k = 0; k <= n / 2; ++k) {
          err = std::max(err, std::abs(cd(X[k * ldX + c]) - Xd[k]));
          ref = std::max(ref, std::abs(Xd[k]));
        }
      }
      CHECK(err <= 1e-6 * ref);
      // The padding column of every output row is untouched.
      bool pad_ok = true;
      for (index_t k = 0; k <= n / 2; ++k) pad_ok = pad_ok && X[k * ldX + C] == sentinel;
      CHECK(pad_ok);

      // Round trip: irfft(rfft(x)) == x (irfft is normalized), padding columns untouched.
      std::vector<float> y(static_cast<std::size_t>(n * ldx), -3.f);
      kernels::irfft(*plan, X.data(), ldX, C, y.data(), ldx);
      double rt = 0;
      bool ypad = true;
      for (index_t m = 0; m < n; ++m) {
        for (index_t c = 0; c < C; ++c) rt = std::max(rt, double(std::abs(y[m * ldx + c] - x[m * ldx + c])));
        for (index_t c = C; c < ldx; ++c) ypad = ypad && y[m * ldx + c] == -3.f;
      }
      CHECK(rt <= 2e-6);
      CHECK(ypad);
    }
  }
}

TEST_CASE("irfft ignores the imaginary parts FFTW's c2r ignores") {
  const index_t n = 12, C = 3;
  const auto plan = kernels::get_fft_plan(n);
  const auto x = random_floats(static_cast<std::size_t>(n * C), 5);
  std::vector<std::complex<float>> X(static_cast<std::size_t>((n / 2 + 1) * C));
  kernels::rfft(*plan, x.data(), C, C, X.data(), C);
  auto Y = X;
  for (index_t c = 0; c < C; ++c) {
    Y[c] += std::complex<float>(0.f, 5.f);
    Y[(n / 2) * C + c] += std::complex<float>(0.f, -2.f);
  }
  std::vector<float> a(static_cast<std::size_t>(n * C)), b(a.size());
  kernels::irfft(*plan, X.data(), C, C, a.data(), C);
  kernels::irfft(*plan, Y.data(), C, C, b.data(), C);
  CHECK(a == b);
}

TEST_CASE("fft_convolve with a filter spectrum is n times the cyclic convolution") {
  constexpr index_t W = simd::width, E = kernels::fft_elem;
  for (index_t n : {1, 8, 30, 1000, 19200}) {
    INFO("n = " << n);
    const auto plan = kernels::get_fft_plan(n);
    // Filter: one real sequence in lane 0, transformed by the same plan (same scrambled order).
    const auto f = random_floats(static_cast<std::size_t>(n), 11);
    std::vector<float> fb(static_cast<std::size_t>(n * E), 0.f);
    for (index_t m = 0; m < n; ++m) fb[m * E] = f[m];
    kernels::fft_forward(*plan, fb.data());
    const auto x = random_floats(static_cast<std::size_t>(n * E), 12);
    std::vector<float> buf = x;
    index_t covered = 0;
    kernels::fft_convolve(*plan, buf.data(), [&](index_t pos0, index_t count, float* elems) {
      CHECK(pos0 == covered);
      covered += count;
      for (index_t k = 0; k < count; ++k) {
        const float sr = fb[(pos0 + k) * E], si = fb[(pos0 + k) * E + W];
        for (index_t c = 0; c < W; ++c) {
          const std::complex<float> z(elems[k * E + c], elems[k * E + W + c]), r = z * std::complex<float>(sr, si);
          elems[k * E + c] = r.real();
          elems[k * E + W + c] = r.imag();
        }
      }
    });
    CHECK(covered == n);
    // Direct cyclic convolution in double on a few rows and lanes (all rows for small n).
    double err = 0, ref = 0;
    const index_t step = std::max<index_t>(1, n / 64);
    for (index_t i = 0; i < n; i += step)
      for (index_t c : {index_t(0), W - 1}) {
        cd s = 0;
        for (index_t j = 0; j < n; ++j) s += double(f[(i - j + n) % n]) * cd(x[j * E + c], x[j * E + W + c]);
        const cd got(buf[i * E + c] / double(n), buf[i * E + W + c] / double(n));
        err = std::max(err, std::abs(got - s));
        ref = std::max(ref, std::abs(s));
      }
    CHECK(err <= 2e-6 * std::max(ref, 1.0));
  }
}

TEST_CASE("fft_convolve with load/store (padded layout, zero inputs skipped) equals the buffer version") {
  constexpr index_t W = simd::width, E = kernels::fft_elem;
  for (index_t n : {30, 1000, 19200, 65536}) {
    const auto plan = kernels::get_fft_plan(n);
    const auto spec = random_floats(static_cast<std::size_t>(2 * n), 21);
    auto mul = [&](index_t pos0, index_t count, float* elems) {
      for (index_t k = 0; k < count; ++k) {
        const simd::vec sr(spec[2 * (pos0 + k)]), si(spec[2 * (pos0 + k) + 1]);
        float* e = elems + k * E;
        const simd::vec re = simd::load(e), im = simd::load(e + W);
        simd::store(e, re * sr - im * si);
        simd::store(e + W, re * si + im * sr);
      }
    };
    for (index_t nonzero : {n, n / 2 + 3, index_t(1)}) {
      INFO("n = " << n << ", nonzero = " << nonzero);
      auto x = random_floats(static_cast<std::size_t>(n * E), 22);
      std::fill(x.begin() + nonzero * E, x.end(), 0.f);
      std::vector<float> want = x;
      kernels::fft_convolve(*plan, want.data(), mul);
      // Scratch full of NaN: any read of a skipped element would poison the result.
      std::vector<float> scratch(static_cast<std::size_t>(plan->padded_size() * E), std::numeric_limits<float>::quiet_NaN());
      std::vector<float> got(static_cast<std::size_t>(n * E), -1.f);
      index_t loads = 0, stores = 0;
      kernels::fft_convolve(
          *plan, scratch.data(),
          [&](index_t m, float* dst) {
            CHECK(m == loads++);
            std::copy(x.begin() + m * E, x.begin() + (m + 1) * E, dst);
          },
          mul,
          [&](index_t m, const float* src) {
            CHECK(m == stores++);
            std::copy(src, src + E, got.begin() + m * E);
          },
          nonzero);
      CHECK(loads == nonzero);
      CHECK(stores == n);
      CHECK(max_rel_diff(got, want) <= 1e-6);
    }
  }
}

TEST_CASE("plans are cached per length and shared across threads") {
  const auto a = kernels::get_fft_plan(360);
  CHECK(kernels::get_fft_plan(360) == a);
  std::vector<const kernels::fft_plan*> got(64, nullptr);
  parallel_for(64, 1, [&](index_t i0, index_t i1) {
    for (index_t i = i0; i < i1; ++i) got[static_cast<std::size_t>(i)] = kernels::get_fft_plan(720).get();
  });
  for (auto* p : got) CHECK(p == kernels::get_fft_plan(720).get());
  kernels::fft_clear_plan_cache();
  CHECK(a->size() == 360);  // a caller's plan outlives the cache entry
  CHECK(kernels::get_fft_plan(360) != a);
  kernels::fft_release_thread_scratch();
}

TEST_CASE("fft_plan rejects lengths with a prime factor above 5") {
  test::require_error([] { kernels::fft_plan p(14); }, {"fft_plan", "n", "2^a 3^b 5^c", "got 14"});
  test::require_error([] { kernels::fft_plan p(0); }, {"fft_plan", "got 0"});
}
