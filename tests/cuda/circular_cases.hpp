// attnkit::cuda::circular_attention's test cases, run through the GPU backend (cuda_backend.cuh,
// cuFFT) and the CPU emulation (test_cuda_emulated_circular.cpp: the same kernels, the transforms
// as plain DFTs). Each case compares with reference_circular_attention (double) by the maximum
// absolute error, as test_circular.cpp does (outputs are convex combinations of v, |v| <= 1), and
// requires identical non-finite values.
//
// A backend provides
//   template <class TL, class TV, class TO> void circular(const tensor3<TL>& logits, const tensor4<TV>& v,
//                                                         tensor4<TO>& out, const circular_params& p);
#pragma once

#include <limits>
#include <vector>

#include "test_util.hpp"

namespace attnkit::test::cuda_cases {

inline circular_params circular_mode(int mode) {
  circular_params p;
  p.causal = mode >= 1;
  p.renormalize = mode == 2;
  return p;
}
inline const char* circular_mode_name(int mode) {
  return mode == 0 ? "non-causal" : mode == 1 ? "causal" : "causal+renormalize";
}

template <class T>
void fill_logits(tensor3<T>& l, std::uint64_t seed, float amplitude) {
  auto g = rng(seed);
  std::uniform_real_distribution<float> u(-amplitude, amplitude);
  for (auto& x : l.buf) x = T(u(g));
}

// Runs the backend and the reference on the same inputs; returns the comparison.
template <class TO = float, class TL, class TV, class Backend>
error_stats run_circular_case(Backend& backend, const tensor3<TL>& l, const tensor4<TV>& v, const circular_params& p,
                              layout out_layout = layout::bshd) {
  const index_t B = v.view.extent(0), N = v.view.extent(1), H = v.view.extent(2), D = v.view.extent(3);
  tensor4<TO> out(B, N, H, D, out_layout);
  tensor4<double> ref(B, N, H, D);
  backend.template circular<TL, TV, TO>(l, v, out, p);
  reference_circular_attention(tensor_view<const TL, 3>(l.view), v.cview(), ref.view, p);
  return compare(out.view, ref.view);
}

// Sequence lengths with the cyclic transform (N = 2^a 3^b 5^c), the linear one (7, a prime) and one
// token; every mode; D = 37; six heads over batch 2.
template <class Backend>
void check_circular_lengths(Backend& backend, bool small, double tol) {
  std::vector<index_t> lengths = {1, 2, 3, 7, 64, 100};
  if (!small) lengths.insert(lengths.end(), {1000, 4096, 10007});
  for (index_t N : lengths)
    for (int mode = 0; mode < 3; ++mode) {
      INFO("N = " << N << ", " << circular_mode_name(mode));
      const index_t B = N > 1000 ? 1 : 2, H = N > 1000 ? 2 : 3, D = N > 1000 ? 5 : 37;
      tensor3<float> l(B, H, N);
      fill_logits(l, 1 + std::uint64_t(N), 3.f);
      tensor4<float> v(B, N, H, D);
      fill_uniform(v, 2 + std::uint64_t(N));
      const error_stats e = run_circular_case(backend, l, v, circular_mode(mode));
      INFO("max abs error " << e.max_abs);
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.max_abs <= tol);
    }
}

// Steep, spiky and plateau logits (renormalize's directly summed prefix rows), logits of +-1e4
// (single lags), -inf and NaN logits and NaN values (only the rows they reach), layouts and dtypes.
template <class Backend>
void check_circular_edges(Backend& backend, bool small, double tol) {
  const float finf = std::numeric_limits<float>::infinity(), fnan = std::numeric_limits<float>::quiet_NaN();
  {
    const index_t N = small ? 300 : 3000, D = small ? 4 : 20;
    tensor4<float> v(1, N, 4, D);
    fill_uniform(v, 3);
    tensor3<float> l(1, 4, N);
    for (index_t j = 0; j < N; ++j) {
      l.view(0, 0, j) = 0.05f * float(j);
      l.view(0, 1, j) = 0.5f * float(j);
      l.view(0, 2, j) = j % 97 == 0 ? 30.f : 0.f;
      l.view(0, 3, j) = j < 2 * N / 3 ? -40.f : 0.f;
    }
    for (int mode = 0; mode < 3; ++mode) {
      INFO("steep / spiky / plateau logits, " << circular_mode_name(mode));
      const error_stats e = run_circular_case(backend, l, v, circular_mode(mode));
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.max_abs <= tol);
    }
  }
  for (index_t N : {index_t(7), index_t(100)}) {
    tensor3<float> l(2, 2, N);
    fill_logits(l, 4, 1e4f);
    tensor4<float> v(2, N, 2, 9);
    fill_uniform(v, 5);
    for (int mode = 0; mode < 3; ++mode) {
      INFO("logits +-1e4, N = " << N << ", " << circular_mode_name(mode));
      const error_stats e = run_circular_case(backend, l, v, circular_mode(mode));
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.max_abs <= tol);
    }
  }
  {
    const index_t N = small ? 60 : 200, H = 3, D = 5;
    tensor3<float> l(1, H, N);
    fill_logits(l, 16, 2.f);
    for (index_t j = 0; j < N; j += 3) l.view(0, 0, j) = -finf;  // head 0: a third masked
    for (index_t j = 0; j < N; ++j) l.view(0, 1, j) = -finf;      // head 1: everything masked
    l.view(0, 2, N / 2) = fnan;                                    // head 2: one NaN logit
    tensor4<float> v(1, N, H, D);
    fill_uniform(v, 17);
    v(0, N / 5, 0, 3) = fnan;  // head 0, channel 3
    for (int mode = 0; mode < 3; ++mode) {
      INFO("-inf and NaN, " << circular_mode_name(mode));
      tensor4<float> out(1, N, H, D);
      backend.template circular<float, float, float>(l, v, out, circular_mode(mode));
      tensor4<double> ref(1, N, H, D);
      reference_circular_attention(tensor_view<const float, 3>(l.view), v.cview(), ref.view, circular_mode(mode));
      const error_stats e = compare(out.view, ref.view);
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.max_abs <= tol);
      CHECK(out(0, 7, 1, 2) == 0.f);
      CHECK(std::isnan(out(0, N / 5, 0, 3)));
      CHECK(std::isnan(out(0, N / 5 - 1, 0, 3)) == (mode == 0));
      CHECK(std::isfinite(out(0, N / 2, 0, 2)));
      CHECK(std::isnan(out(0, N / 2, 2, 0)));
      CHECK(std::isnan(out(0, N / 2 - 1, 2, 0)) == (mode != 2));
    }
  }
  {
    const index_t N = 50, B = 2, H = 2, D = 6;
    tensor3<float> l(B, H, N);
    fill_logits(l, 21, 2.f);
    tensor4<float> vb(B, N, H, D, layout::bhsd);
    fill_uniform(vb, 22);
    for (int mode = 0; mode < 3; ++mode) {
      INFO("v BHSD, out padded, " << circular_mode_name(mode));
      const error_stats e = run_circular_case(backend, l, vb, circular_mode(mode), layout::padded);
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.max_abs <= tol);
    }
    tensor3<bf16> lb(B, H, N);
    fill_logits(lb, 23, 2.f);
    tensor4<f16> vh(B, N, H, D);
    fill_uniform(vh, 24);
    tensor3<double> ld(B, H, N);
    fill_logits(ld, 25, 2.f);
    tensor4<double> vd(B, N, H, D);
    fill_uniform(vd, 26);
    for (int mode = 0; mode < 3; ++mode) {
      INFO("bf16 logits, f16 values; double in, double out; " << circular_mode_name(mode));
      error_stats e = run_circular_case(backend, lb, vh, circular_mode(mode));
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.max_abs <= tol);
      e = run_circular_case<double>(backend, ld, vd, circular_mode(mode));
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.max_abs <= tol);
    }
  }
}

// Empty extents are a no-op; bad shapes throw the CPU operator's messages before anything is written.
template <class Backend>
void check_circular_empty_and_errors(Backend& backend) {
  for (auto [B, N, D] : {std::tuple<index_t, index_t, index_t>{0, 5, 3}, {2, 0, 3}, {2, 5, 0}}) {
    tensor3<float> l(B, 2, N, 0.f);
    tensor4<float> v(B, N, 2, D), out(B, N, 2, D);
    fill_value(v, 1.f);
    backend.template circular<float, float, float>(l, v, out, circular_params{});
    CHECK(untouched(out.buf, std::numeric_limits<float>::quiet_NaN()));
  }
  tensor3<float> l(1, 2, 10, 0.f);
  tensor4<float> v(1, 9, 2, 4), out(1, 10, 2, 4);
  fill_value(v, 1.f);
  require_error([&] { backend.template circular<float, float, float>(l, v, out, circular_params{}); },
                {"cuda::circular_attention", "v", "sequence length 10"});
  tensor4<float> v2(1, 10, 2, 4), out2(1, 10, 3, 4);
  fill_value(v2, 1.f);
  require_error([&] { backend.template circular<float, float, float>(l, v2, out2, circular_params{}); },
                {"cuda::circular_attention", "out"});
  CHECK(untouched(out.buf, std::numeric_limits<float>::quiet_NaN()));
  CHECK(untouched(out2.buf, std::numeric_limits<float>::quiet_NaN()));
}

}  // namespace attnkit::test::cuda_cases
