// Shared tile kernels against plain loops.
#include "test_util.hpp"

#include <attnkit/kernels/fft.hpp>
#include <attnkit/kernels/gemm.hpp>
#include <attnkit/kernels/scratch.hpp>

#include <cstdint>

using namespace attnkit;

TEST_CASE("gemm_acc equals a plain triple loop for every remainder of rows and vector blocks") {
  auto g = test::rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (index_t M : {1, 3, kernels::gemm_mr, kernels::gemm_mr + 5, 3 * kernels::gemm_mr + 1})
    for (index_t nv : {1, 2, 3, 4, 5, 7})
      for (index_t K : {0, 1, 9, 64})
        for (bool col_major_a : {false, true})
          for (bool scaled : {false, true}) {
            const index_t N = nv * simd::width, ldb = N + 3, ldc = N + 5;
            std::vector<float> a(static_cast<std::size_t>(M * K + 1)), b(static_cast<std::size_t>(K * ldb + 1)),
                c(static_cast<std::size_t>(M * ldc)), s(static_cast<std::size_t>(N));
            for (auto* v : {&a, &b, &c, &s})
              for (auto& x : *v) x = u(g);
            const index_t rs = col_major_a ? 1 : K, cs = col_major_a ? M : 1;
            std::vector<double> want(c.size());
            for (index_t m = 0; m < M; ++m)
              for (index_t n = 0; n < N; ++n) {
                double acc = double(c[m * ldc + n]) * (scaled ? s[n] : 1.f);
                for (index_t k = 0; k < K; ++k) acc += double(a[m * rs + k * cs]) * b[k * ldb + n];
                want[m * ldc + n] = acc;
              }
            std::vector<double> want_set(c.size());
            for (index_t m = 0; m < M; ++m)
              for (index_t n = 0; n < N; ++n) {
                double acc = 0;
                for (index_t k = 0; k < K; ++k) acc += double(a[m * rs + k * cs]) * b[k * ldb + n];
                want_set[m * ldc + n] = acc;
              }
            std::vector<float> c_set = c;
            kernels::gemm_acc(M, N, K, a.data(), rs, cs, b.data(), ldb, c.data(), ldc, scaled ? s.data() : nullptr);
            kernels::gemm_set(M, N, K, a.data(), rs, cs, b.data(), ldb, c_set.data(), ldc);
            // The same product in double through the double overload.
            std::vector<double> ad(a.begin(), a.end()), bd(b.begin(), b.end()), cd(c_set.size(), 5.0);
            kernels::gemm_set(M, N, K, ad.data(), rs, cs, bd.data(), ldb, cd.data(), ldc);
            double err = 0, err_set = 0, err_d = 0;
            for (index_t m = 0; m < M; ++m)
              for (index_t n = 0; n < N; ++n) {
                err = std::max(err, std::abs(c[m * ldc + n] - want[m * ldc + n]));
                err_set = std::max(err_set, std::abs(c_set[m * ldc + n] - want_set[m * ldc + n]));
                err_d = std::max(err_d, std::abs(cd[m * ldc + n] - want_set[m * ldc + n]));
              }
            INFO("M=" << M << " N=" << N << " K=" << K);
            CHECK(err <= 1e-5 * double(K + 1));
            CHECK(err_set <= 1e-5 * double(K + 1));
            CHECK(err_d <= 1e-13 * double(K + 1));
          }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// Compiled wherever the target has AVX-512 BF16, including targets whose softmax operators do not
// use it (simd::prefer_bf16_dot false), so the kernel stays checked on every such machine.
TEST_CASE("gemm_bf16_set equals scale * A B on the bf16 values for every remainder of rows and vector blocks") {
  auto g = test::rng(11);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  for (index_t M : {1, 5, kernels::gemm_mr, kernels::gemm_mr + 3, 2 * kernels::gemm_mr + 1})
    for (index_t nv : {1, 2, 3, 4, 5})
      for (index_t KP : {1, 3, 64}) {
        const index_t N = nv * simd::width, rs = 2 * KP + 3, ldb = N + 7, ldc = N + 5;
        std::vector<bf16> a(static_cast<std::size_t>(M * rs)), bm(static_cast<std::size_t>(2 * KP * N));
        for (auto& x : a) x = bf16(u(g));
        for (auto& x : bm) x = bf16(u(g));
        std::vector<std::uint32_t> b(static_cast<std::size_t>(KP * ldb), 0u);
        for (index_t kp = 0; kp < KP; ++kp)
          for (index_t n = 0; n < N; ++n)
            b[kp * ldb + n] = std::uint32_t(Eigen::numext::bit_cast<std::uint16_t>(bm[2 * kp * N + n])) |
                              (std::uint32_t(Eigen::numext::bit_cast<std::uint16_t>(bm[(2 * kp + 1) * N + n])) << 16);
        std::vector<float> c(static_cast<std::size_t>(M * ldc), -9.f);
        const float scale = 0.37f;
        kernels::gemm_bf16_set(M, N, KP, a.data(), rs, b.data(), ldb, c.data(), ldc, scale);
        double worst = 0;
        for (index_t m = 0; m < M; ++m) {
          for (index_t n = 0; n < N; ++n) {
            double want = 0, mag = 0;
            for (index_t k = 0; k < 2 * KP; ++k) {
              const double t = double(float(a[m * rs + k])) * double(float(bm[k * N + n]));
              want += t;
              mag += std::abs(t);
            }
            worst = std::max(worst, std::abs(c[m * ldc + n] - scale * want) / (scale * mag + 1e-30));
          }
          for (index_t n = N; n < ldc; ++n) CHECK(c[m * ldc + n] == -9.f);  // nothing written past N
        }
        INFO("M=" << M << " N=" << N << " KP=" << KP);
        CHECK(worst <= 1e-6 * double(KP + 1));
      }
}
#endif

template <class T>
void check_decode_kernels(std::uint64_t seed) {
  auto g = test::rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const index_t W = simd::width;
  for (index_t n : {index_t(1), index_t(7), W, W + 3, 2 * W, 8 * W, 8 * W + 5})
    for (index_t nr : {index_t(1), index_t(3), index_t(4), index_t(5), index_t(16)})
      for (index_t nk : {index_t(1), index_t(2), index_t(5), index_t(32)})
        for (index_t step : {index_t(1), index_t(3)}) {  // scores of key j at out[r * ldo + j * step]
          INFO("n=" << n << " nr=" << nr << " nk=" << nk << " step=" << step);
          const index_t np = kernels::pad_to_width(n), ks = n + 3, ldo = nk * step + 1;
          std::vector<float> x(static_cast<std::size_t>(nr * np), 0.f), out(static_cast<std::size_t>(nr * ldo), -7.f);
          std::vector<T> k(static_cast<std::size_t>(nk * ks));
          for (index_t r = 0; r < nr; ++r)
            for (index_t d = 0; d < n; ++d) x[r * np + d] = u(g);
          for (auto& e : k) e = T(u(g));
          kernels::dot_rows(x.data(), np, nr, k.data(), ks, n, nk, out.data(), ldo, step);
          // accumulate_rows: o_r = alpha_r o_r + sum_j p_rj v_j, with p = the scores just computed.
          std::vector<float> o(static_cast<std::size_t>(nr * np), 0.f), alpha(static_cast<std::size_t>(nr));
          for (index_t r = 0; r < nr; ++r) {
            alpha[r] = u(g);
            for (index_t e = 0; e < n; ++e) o[r * np + e] = u(g);
          }
          auto o_in = o;
          kernels::accumulate_rows(o.data(), np, nr, alpha.data(), out.data(), ldo, k.data(), ks, n, nk, step);
          for (index_t r = 0; r < nr; ++r) {
            for (index_t j = 0; j < nk; ++j) {
              double want = 0, mag = 0;
              for (index_t d = 0; d < n; ++d) {
                const double t = double(x[r * np + d]) * double(convert<float>(k[j * ks + d]));
                want += t;
                mag += std::abs(t);
              }
              CHECK(std::abs(out[r * ldo + j * step] - want) <= 1e-6 * mag);
            }
            for (index_t c = 0; c < ldo; ++c)  // nothing written between or past the keys' slots
              if (c % step != 0 || c >= nk * step) CHECK(out[r * ldo + c] == -7.f);
            for (index_t e = 0; e < np; ++e) {
              double want = double(alpha[r]) * o_in[r * np + e], mag = std::abs(want);
              for (index_t j = 0; j < nk && e < n; ++j) {
                const double t = double(out[r * ldo + j * step]) * double(convert<float>(k[j * ks + e]));
                want += t;
                mag += std::abs(t);
              }
              CHECK(std::abs(o[r * np + e] - want) <= 1e-6 * mag);
            }
          }
        }
}

TEST_CASE("dot_rows and accumulate_rows equal their definitions for every row, key and dim count") {
  check_decode_kernels<float>(11);
  check_decode_kernels<bf16>(12);
  check_decode_kernels<f16>(13);
}

TEST_CASE("per-thread scratch is 64-byte aligned, grows, and keeps its contents while large enough") {
  // The kernels read whole vectors (up to 64 bytes) from these tiles: a misaligned tile would
  // split vectors across cache lines. Odd sizes and both element types, growing and shrinking.
  for (std::size_t slot : {std::size_t(0), std::size_t(7)})
    for (std::size_t n : {std::size_t(1), std::size_t(3), std::size_t(1000), std::size_t(300000), std::size_t(5)}) {
      INFO("slot " << slot << ", n " << n);
      float* f = kernels::thread_scratch<float>(slot, n);
      CHECK(reinterpret_cast<std::uintptr_t>(f) % 64 == 0);
      f[n - 1] = 42.f;
      CHECK(kernels::thread_scratch<float>(slot, n)[n - 1] == 42.f);  // same size: same buffer
      auto* d = kernels::thread_scratch<double>(slot, n);
      CHECK(reinterpret_cast<std::uintptr_t>(d) % 64 == 0);
      float* g = kernels::fft_thread_scratch(int(slot % kernels::fft_scratch_slots), index_t(n));
      CHECK(reinterpret_cast<std::uintptr_t>(g) % 64 == 0);
    }
  kernels::fft_release_thread_scratch();
  CHECK(reinterpret_cast<std::uintptr_t>(kernels::fft_thread_scratch(0, 17)) % 64 == 0);
}
