// The naive baseline every softmax operator is compared with: per (batch, head), S = scale Q K^T
// with Eigen's GEMM (which uses the OpenMP threads), a row softmax, O = P V. O(N^2) memory.
#pragma once

#include <Eigen/Dense>

#include <attnkit/attnkit.hpp>

namespace attnkit::bench {

// q, k, v, out: contiguous BSHD float, Hq == Hkv == H.
inline void naive_eigen_attention(const float* q, const float* k, const float* v, float* out, index_t B,
                                  index_t Nq, index_t Nk, index_t H, index_t D, bool causal) {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
  using Map = Eigen::Map<Mat, 0, Eigen::OuterStride<>>;
  const float scale = 1.f / std::sqrt(float(D));
  Mat S(Nq, Nk);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      CMap Q(q + (b * Nq * H + h) * D, Nq, D, Eigen::OuterStride<>(H * D));
      CMap K(k + (b * Nk * H + h) * D, Nk, D, Eigen::OuterStride<>(H * D));
      CMap V(v + (b * Nk * H + h) * D, Nk, D, Eigen::OuterStride<>(H * D));
      Map O(out + (b * Nq * H + h) * D, Nq, D, Eigen::OuterStride<>(H * D));
      S.noalias() = scale * (Q * K.transpose());
      for (index_t i = 0; i < Nq; ++i) {
        auto r = S.row(i);
        if (causal)
          for (index_t j = i + (Nk - Nq) + 1; j < Nk; ++j) r(j) = -std::numeric_limits<float>::infinity();
        r = (r.array() - r.maxCoeff()).exp();
        r /= r.sum();
      }
      O.noalias() = S * V;
    }
}

}  // namespace attnkit::bench
