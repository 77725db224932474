// Register-blocked float GEMM micro-kernels on SIMD vectors, shared by every operator that does
// tile arithmetic (flash, linear, sparse, block-sparse):
//   gemm_acc: C[m][n] = C[m][n] * col_scale[n] + sum_k A(m, k) * B[k][n]   (col_scale optional)
//   gemm_set: C[m][n] = sum_k A(m, k) * B[k][n]
// A is read element by element (broadcast) at a[m * rs_a + k * cs_a], so it may be row- or
// column-major; B and C are row-major with leading dimensions ldb / ldc. N must be a multiple of
// simd::width: callers pad their tiles. Each C element sums k in increasing order whatever the
// blocking, so results do not depend on tile sizes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "attnkit/simd/simd.hpp"

namespace attnkit::kernels {

// Rounds n up to a multiple of the vector width (the padding gemm_acc needs on N).
inline constexpr index_t pad_to_width(index_t n) { return (n + simd::width - 1) / simd::width * simd::width; }

// Register block: MR rows of A broadcast against NV vectors of B. 32 vector registers (AVX-512)
// hold 8 x 3 accumulators; 16 registers (SSE, AVX2) hold 4 x 3.
inline constexpr int gemm_mr = simd::width >= 16 ? 8 : 4;
inline constexpr int gemm_nv = 3;

namespace detail {

template <int MR, int NV>
inline void gemm_block(index_t K, const float* a, index_t rs_a, index_t cs_a, const float* b, index_t ldb,
                       float* c, index_t ldc, const float* col_scale, bool overwrite) {
  using simd::vec;
  constexpr index_t W = simd::width;
  vec acc[MR][NV];
  if (overwrite) {
    ATTNKIT_UNROLL
    for (int r = 0; r < MR; ++r)
      ATTNKIT_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = vec(0.f);
  } else if (col_scale) {
    vec s[NV];
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) s[v] = simd::load(col_scale + v * W);
    ATTNKIT_UNROLL
    for (int r = 0; r < MR; ++r)
      ATTNKIT_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = simd::load(c + r * ldc + v * W) * s[v];
  } else {
    ATTNKIT_UNROLL
    for (int r = 0; r < MR; ++r)
      ATTNKIT_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = simd::load(c + r * ldc + v * W);
  }
  for (index_t k = 0; k < K; ++k) {
    vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = simd::in_register(simd::load(b + k * ldb + v * W));
    const float* ak = a + k * cs_a;
    for (int r = 0; r < MR; ++r) {
      const vec ar(ak[r * rs_a]);
      for (int v = 0; v < NV; ++v) acc[r][v] = simd::fma(ar, bv[v], acc[r][v]);
    }
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) simd::store(c + r * ldc + v * W, acc[r][v]);
}

template <int MR>
inline void gemm_row_block(index_t N, index_t K, const float* a, index_t rs_a, index_t cs_a, const float* b,
                           index_t ldb, float* c, index_t ldc, const float* col_scale, bool overwrite) {
  constexpr index_t W = simd::width;
  // Blocks of 3 vectors, then the remainder; a remainder of one vector after at least one block
  // (4, 7, ... vectors, e.g. 64 floats with AVX-512) is taken as 2 + 2 instead of 3 + 1, since an
  // MR x 1 block is bound by the FMA latency.
  const index_t nv = N / W;
  const index_t full = (nv >= 4 && nv % gemm_nv == 1) ? nv / gemm_nv - 1 : nv / gemm_nv;
  index_t n = 0;
  for (index_t blk = 0; blk < full; ++blk, n += gemm_nv * W)
    gemm_block<MR, gemm_nv>(K, a, rs_a, cs_a, b + n, ldb, c + n, ldc, col_scale ? col_scale + n : nullptr,
                            overwrite);
  if ((N - n) / W == 4) {
    gemm_block<MR, 2>(K, a, rs_a, cs_a, b + n, ldb, c + n, ldc, col_scale ? col_scale + n : nullptr, overwrite);
    n += 2 * W;
  }
  const index_t rest = (N - n) / W;
  const float* cs = col_scale ? col_scale + n : nullptr;
  if (rest == 2) gemm_block<MR, 2>(K, a, rs_a, cs_a, b + n, ldb, c + n, ldc, cs, overwrite);
  else if (rest == 1) gemm_block<MR, 1>(K, a, rs_a, cs_a, b + n, ldb, c + n, ldc, cs, overwrite);
  static_assert(gemm_nv == 3, "remainder dispatch above assumes 3 vectors per block");
}

template <int MR>
inline void gemm_tail_rows(index_t rows, index_t N, index_t K, const float* a, index_t rs_a, index_t cs_a,
                           const float* b, index_t ldb, float* c, index_t ldc, const float* col_scale,
                           bool overwrite) {
  if constexpr (MR > 0) {
    if (rows == MR) return gemm_row_block<MR>(N, K, a, rs_a, cs_a, b, ldb, c, ldc, col_scale, overwrite);
    gemm_tail_rows<MR - 1>(rows, N, K, a, rs_a, cs_a, b, ldb, c, ldc, col_scale, overwrite);
  }
}

inline void gemm(index_t M, index_t N, index_t K, const float* a, index_t rs_a, index_t cs_a, const float* b,
                 index_t ldb, float* c, index_t ldc, const float* col_scale, bool overwrite) {
  index_t m = 0;
  for (; m + gemm_mr <= M; m += gemm_mr)
    gemm_row_block<gemm_mr>(N, K, a + m * rs_a, rs_a, cs_a, b, ldb, c + m * ldc, ldc, col_scale, overwrite);
  if (m < M)
    gemm_tail_rows<gemm_mr - 1>(M - m, N, K, a + m * rs_a, rs_a, cs_a, b, ldb, c + m * ldc, ldc, col_scale,
                                overwrite);
}

// Double precision: plain loops in the same k order (double operators favour exactness over speed).
inline void gemm(index_t M, index_t N, index_t K, const double* a, index_t rs_a, index_t cs_a, const double* b,
                 index_t ldb, double* c, index_t ldc, const double* col_scale, bool overwrite) {
  for (index_t m = 0; m < M; ++m) {
    double* cm = c + m * ldc;
    for (index_t n = 0; n < N; ++n) cm[n] = overwrite ? 0.0 : col_scale ? cm[n] * col_scale[n] : cm[n];
    for (index_t k = 0; k < K; ++k) {
      const double amk = a[m * rs_a + k * cs_a];
      const double* bk = b + k * ldb;
      for (index_t n = 0; n < N; ++n) cm[n] += amk * bk[n];
    }
  }
}

}  // namespace detail

template <class T>
inline void gemm_acc(index_t M, index_t N, index_t K, const T* a, index_t rs_a, index_t cs_a, const T* b,
                     index_t ldb, T* c, index_t ldc, const T* col_scale = nullptr) {
  detail::gemm(M, N, K, a, rs_a, cs_a, b, ldb, c, ldc, col_scale, false);
}

template <class T>
inline void gemm_set(index_t M, index_t N, index_t K, const T* a, index_t rs_a, index_t cs_a, const T* b,
                     index_t ldb, T* c, index_t ldc) {
  detail::gemm(M, N, K, a, rs_a, cs_a, b, ldb, c, ldc, nullptr, true);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
namespace detail {
template <int MR, int NV>
inline void gemm_bf16_block(index_t KP, const bf16* a, index_t rs_a, const std::uint32_t* b, index_t ldb, float* c,
                            index_t ldc, float scale) {
  using simd::vec;
  constexpr index_t W = simd::width;
  vec acc[MR][NV];
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = vec(0.f);
  for (index_t kp = 0; kp < KP; ++kp) {
    const std::uint32_t* bk = b + kp * ldb;
    for (int r = 0; r < MR; ++r) {
      std::uint32_t pair;
      std::memcpy(&pair, a + r * rs_a + 2 * kp, sizeof(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = simd::dot_bf16_pairs(acc[r][v], pair, bk + v * W);
    }
  }
  const vec sv(scale);
  ATTNKIT_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTNKIT_UNROLL
    for (int v = 0; v < NV; ++v) simd::store(c + r * ldc + v * W, acc[r][v] * sv);
}

template <int MR>
inline void gemm_bf16_rows(index_t N, index_t KP, const bf16* a, index_t rs_a, const std::uint32_t* b, index_t ldb,
                           float* c, index_t ldc, float scale) {
  constexpr index_t W = simd::width;
  index_t n = 0;
  for (; n + gemm_nv * W <= N; n += gemm_nv * W) gemm_bf16_block<MR, gemm_nv>(KP, a, rs_a, b + n, ldb, c + n, ldc, scale);
  const index_t rest = (N - n) / W;
  if (rest == 2) gemm_bf16_block<MR, 2>(KP, a, rs_a, b + n, ldb, c + n, ldc, scale);
  else if (rest == 1) gemm_bf16_block<MR, 1>(KP, a, rs_a, b + n, ldb, c + n, ldc, scale);
}

template <int MR>
inline void gemm_bf16_tail(index_t rows, index_t N, index_t KP, const bf16* a, index_t rs_a, const std::uint32_t* b,
                           index_t ldb, float* c, index_t ldc, float scale) {
  if constexpr (MR > 0) {
    if (rows == MR) return gemm_bf16_rows<MR>(N, KP, a, rs_a, b, ldb, c, ldc, scale);
    gemm_bf16_tail<MR - 1>(rows, N, KP, a, rs_a, b, ldb, c, ldc, scale);
  }
}
}  // namespace detail

// C[m][n] = scale * sum_k A[m][k] * B[k][n] with bf16 A rows (a + m * rs_a, elements contiguous,
// 2 * KP of them) and B packed as bf16 pairs: b[kp * ldb + n] holds (B[2kp][n], B[2kp+1][n]).
// Uses the AVX-512 BF16 pair dot product: twice the multiply-adds of a float FMA per instruction.
inline void gemm_bf16_set(index_t M, index_t N, index_t KP, const bf16* a, index_t rs_a, const std::uint32_t* b,
                          index_t ldb, float* c, index_t ldc, float scale) {
  index_t m = 0;
  for (; m + gemm_mr <= M; m += gemm_mr) detail::gemm_bf16_rows<gemm_mr>(N, KP, a + m * rs_a, rs_a, b, ldb, c + m * ldc, ldc, scale);
  if (m < M) detail::gemm_bf16_tail<gemm_mr - 1>(M - m, N, KP, a + m * rs_a, rs_a, b, ldb, c + m * ldc, ldc, scale);
}
#endif

// Few query rows against many keys (decode), where a GEMM would leave most lanes idle. Rows of x
// are float, zero padded to a multiple of simd::width; key and value rows are read in place
// (float, bf16 or f16, elements contiguous) and converted in registers, so a K/V row streamed
// from memory is loaded once for all query rows of a block.
namespace detail {

// Rows clamped to the last valid one: the lanes they feed are computed and never stored.
template <class T>
inline const T* clamped_row(const T* base, index_t stride, index_t i, index_t n) {
  return base + std::min(i, n - 1) * stride;
}

template <class T>
inline simd::vec load_or_tail(const T* p, index_t avail) {
  return avail >= simd::width ? simd::load(p) : simd::load_tail(p, avail);
}

}  // namespace detail

// out[r * ldo + j * jo] = dot(x_r, k_j) over n elements, for r < nr and j < nk, with x_r = x + r * ldx
// (zero padded up to pad_to_width(n)) and k_j = k + j * ks. A block of dot_rows_r rows by
// width / dot_rows_r keys keeps one accumulator per pair, summed across lanes by one transposing
// reduction; each key vector is loaded once per block of rows.
inline constexpr index_t dot_rows_r = simd::width >= 4 ? 4 : simd::width;

template <class T>
inline void dot_rows(const float* x, index_t ldx, index_t nr, const T* k, index_t ks, index_t n, index_t nk,
                     float* out, index_t ldo, index_t jo = 1) {
  using simd::vec;
  constexpr index_t W = simd::width, RB = dot_rows_r, KB = W / RB;
  if (nr <= 0 || nk <= 0) return;
  const index_t n_full = n / W * W;
  for (index_t r0 = 0; r0 < nr; r0 += RB) {
    const float* xr[RB];
    for (index_t i = 0; i < RB; ++i) xr[i] = detail::clamped_row(x, ldx, r0 + i, nr);
    for (index_t j0 = 0; j0 < nk; j0 += KB) {
      const T* kj[KB];
      for (index_t t = 0; t < KB; ++t) kj[t] = detail::clamped_row(k, ks, j0 + t, nk);
      vec acc[W];
      for (index_t a = 0; a < W; ++a) acc[a] = vec(0.f);
      index_t d = 0;
      for (; d < n_full; d += W) {
        vec kv[KB];
        for (index_t t = 0; t < KB; ++t) kv[t] = simd::in_register(simd::load(kj[t] + d));
        for (index_t i = 0; i < RB; ++i) {
          const vec xv = simd::in_register(simd::load(xr[i] + d));
          for (index_t t = 0; t < KB; ++t) acc[i * KB + t] = simd::fma(xv, kv[t], acc[i * KB + t]);
        }
      }
      if (d < n) {
        vec kv[KB];
        for (index_t t = 0; t < KB; ++t) kv[t] = simd::load_tail(kj[t] + d, n - d);
        for (index_t i = 0; i < RB; ++i) {
          const vec xv = simd::load(xr[i] + d);
          for (index_t t = 0; t < KB; ++t) acc[i * KB + t] = simd::fma(xv, kv[t], acc[i * KB + t]);
        }
      }
      alignas(64) float sums[W];
      simd::hsum_rows(acc).store_aligned(sums);
      for (index_t i = 0; i < std::min(RB, nr - r0); ++i)
        for (index_t t = 0; t < std::min(KB, nk - j0); ++t) out[(r0 + i) * ldo + (j0 + t) * jo] = sums[i * KB + t];
    }
  }
}

namespace detail {

template <int NR, int CV, bool Full, class T>
inline void accumulate_rows_block(float* o, index_t ldo, const float* alpha, const float* p, index_t ldp, index_t pj,
                                  const T* v, index_t vs, index_t avail, index_t nk) {
  using simd::vec;
  constexpr index_t W = simd::width;
  vec acc[NR][CV];
  ATTNKIT_UNROLL
  for (int i = 0; i < NR; ++i) {
    const vec a(alpha[i]);
    ATTNKIT_UNROLL
    for (int c = 0; c < CV; ++c) acc[i][c] = simd::load(o + i * ldo + c * W) * a;
  }
  for (index_t j = 0; j < nk; ++j) {
    const T* vj = v + j * vs;
    vec vv[CV];
    for (int c = 0; c < CV; ++c)
      vv[c] = simd::in_register(Full ? simd::load(vj + c * W)
                                     : load_or_tail(vj + c * W, std::max<index_t>(avail - c * W, 0)));
    for (int i = 0; i < NR; ++i) {
      const vec pb(p[i * ldp + j * pj]);
      for (int c = 0; c < CV; ++c) acc[i][c] = simd::fma(pb, vv[c], acc[i][c]);
    }
  }
  ATTNKIT_UNROLL
  for (int i = 0; i < NR; ++i)
    ATTNKIT_UNROLL
    for (int c = 0; c < CV; ++c) simd::store(o + i * ldo + c * W, acc[i][c]);
}

template <int NR, class T>
inline void accumulate_rows_fixed(float* o, index_t ldo, const float* alpha, const float* p, index_t ldp, index_t pj,
                                  const T* v, index_t vs, index_t n, index_t nk) {
  constexpr index_t W = simd::width;
  constexpr int CV = W >= 16 ? 4 : 2;  // NR x CV accumulators + CV values fit the register file
  const index_t np = pad_to_width(n);
  index_t e = 0;
  for (; e + CV * W <= n; e += CV * W)
    accumulate_rows_block<NR, CV, true>(o + e, ldo, alpha, p, ldp, pj, v + e, vs, n - e, nk);
  for (; e < np; e += W)
    accumulate_rows_block<NR, 1, false>(o + e, ldo, alpha, p, ldp, pj, v + e, vs, n - e, nk);
}

}  // namespace detail

// o_r = alpha[r] * o_r + sum_j p[r * ldp + j * pj] * v_j for r < nr, j < nk, where o_r = o + r * ldo
// holds pad_to_width(n) floats (the padding stays 0 when it was) and v_j = v + j * vs holds n
// elements. Keys run in increasing order for every element.
template <class T>
inline void accumulate_rows(float* o, index_t ldo, index_t nr, const float* alpha, const float* p, index_t ldp,
                            const T* v, index_t vs, index_t n, index_t nk, index_t pj = 1) {
  index_t r = 0;
  for (; r + 4 <= nr; r += 4) detail::accumulate_rows_fixed<4>(o + r * ldo, ldo, alpha + r, p + r * ldp, ldp, pj, v, vs, n, nk);
  switch (nr - r) {
    case 3: detail::accumulate_rows_fixed<3>(o + r * ldo, ldo, alpha + r, p + r * ldp, ldp, pj, v, vs, n, nk); break;
    case 2: detail::accumulate_rows_fixed<2>(o + r * ldo, ldo, alpha + r, p + r * ldp, ldp, pj, v, vs, n, nk); break;
    case 1: detail::accumulate_rows_fixed<1>(o + r * ldo, ldo, alpha + r, p + r * ldp, ldp, pj, v, vs, n, nk); break;
    default: break;
  }
}


}  // namespace attnkit::kernels
