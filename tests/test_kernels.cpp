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

TEST_CASE("dot_rows equals per-row dot products for every row count") {
  auto g = test::rng(11);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (index_t n : {simd::width, 2 * simd::width, 8 * simd::width})
    for (index_t nr : {index_t(1), index_t(5), simd::width, simd::width + 3, 4 * simd::width}) {
      const index_t ld = n + simd::width;
      std::vector<float> x(static_cast<std::size_t>(n)), rows(static_cast<std::size_t>(kernels::pad_to_width(nr) * ld)),
          out(static_cast<std::size_t>(kernels::pad_to_width(nr)));
      for (auto& e : x) e = u(g);
      for (auto& e : rows) e = u(g);
      kernels::dot_rows(x.data(), rows.data(), ld, n, nr, out.data());
      for (index_t j = 0; j < nr; ++j) {
        double want = 0;
        for (index_t d = 0; d < n; ++d) want += double(x[d]) * rows[j * ld + d];
        CHECK(out[j] == Approx(want).margin(1e-5));
      }
    }
}
