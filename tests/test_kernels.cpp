// Shared tile kernels against plain loops.
#include "test_util.hpp"

#include <attnkit/kernels/gemm.hpp>

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

template <class T>
void check_decode_kernels(std::uint64_t seed) {
  auto g = test::rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const index_t W = simd::width;
  for (index_t n : {index_t(1), index_t(7), W, W + 3, 2 * W, 8 * W, 8 * W + 5})
    for (index_t nr : {index_t(1), index_t(3), index_t(4), index_t(5), index_t(16)})
      for (index_t nk : {index_t(1), index_t(2), index_t(5), index_t(32)}) {
        const index_t np = kernels::pad_to_width(n), ks = n + 3, ldo = nk + 1;
        std::vector<float> x(static_cast<std::size_t>(nr * np), 0.f), out(static_cast<std::size_t>(nr * ldo), -7.f);
        std::vector<T> k(static_cast<std::size_t>(nk * ks));
        for (index_t r = 0; r < nr; ++r)
          for (index_t d = 0; d < n; ++d) x[r * np + d] = u(g);
        for (auto& e : k) e = T(u(g));
        kernels::dot_rows(x.data(), np, nr, k.data(), ks, n, nk, out.data(), ldo);
        // accumulate_rows: o_r = alpha_r o_r + sum_j p_rj v_j, with p = the scores just computed.
        std::vector<float> o(static_cast<std::size_t>(nr * np), 0.f), alpha(static_cast<std::size_t>(nr));
        for (index_t r = 0; r < nr; ++r) {
          alpha[r] = u(g);
          for (index_t e = 0; e < n; ++e) o[r * np + e] = u(g);
        }
        auto o_in = o;
        kernels::accumulate_rows(o.data(), np, nr, alpha.data(), out.data(), ldo, k.data(), ks, n, nk);
        for (index_t r = 0; r < nr; ++r) {
          for (index_t j = 0; j < nk; ++j) {
            double want = 0, mag = 0;
            for (index_t d = 0; d < n; ++d) {
              const double t = double(x[r * np + d]) * double(convert<float>(k[j * ks + d]));
              want += t;
              mag += std::abs(t);
            }
            CHECK(std::abs(out[r * ldo + j] - want) <= 1e-6 * mag);
          }
          CHECK(out[r * ldo + nk] == -7.f);  // nothing written past nk
          for (index_t e = 0; e < np; ++e) {
            double want = double(alpha[r]) * o_in[r * np + e], mag = std::abs(want);
            for (index_t j = 0; j < nk && e < n; ++j) {
              const double t = double(out[r * ldo + j]) * double(convert<float>(k[j * ks + e]));
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
