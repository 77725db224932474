// Linear attention kernels (the definition is in ops/linear.hpp). Feature rows, scores and the
// (features x value columns) state live in shared memory in the accumulation type (float, or
// double when an input is double); the arithmetic is plain FMA, every sum in a fixed order.
//
// Work decomposition. The value columns of the state S = sum_j phi(k_j) v_j^T are independent, so
// a block owns one (batch, head) and one tile of dv_tile value columns, and recomputes the feature
// rows it needs (cheap next to the state products for the usual F = Dv). Sequences are walked in
// chunks of linear_rows positions.
//   causal      linear_causal_kernel, one block per (batch, query head, column tile), chunk by chunk:
//               out_i = gamma^(i+1) phi(q_i) S + sum_{j <= i in chunk} gamma^(i-j) phi(q_i).phi(k_j) v_j
//               (masked scores are never read, so a NaN in v_j reaches rows i >= j only), then
//               S <- gamma^L S + sum_j gamma^(L-1-j) phi(k_j) v_j^T and the same for z. Decay
//               exponents stay within a chunk, as on the CPU.
//   non-causal  linear_state_kernel (one block per (batch, kv head, column tile)) sums S and z over
//               all keys into a workspace; linear_query_kernel (one block per (batch, query head,
//               chunk of queries, column tile)) applies them.
//
// FAVOR+ stabilization (per feature, unlike the CPU's single key maximum): with logits
// l_jf = (W k'_j)_f - |k'_j|^2 / 2, key features are exp(l_jf - K_f - log(m)/2) with K_f the running
// maximum of feature f over the keys read so far (S and z rows are rescaled when it grows), and
// query features exp(a_if - A_i - log(m)/2) with a_if = (W q'_i)_f - |q'_i|^2 / 2 + K_f and A_i their
// row maximum. phi(q_i).phi(k_j) then carries the factor exp(-A_i) exactly, which
// kernels::linear_output_factor undoes (stab = A_i), so the output is the definition's whatever
// the stabilizers; a per-feature maximum keeps every feature's state in range even when the
// features' scales differ widely.
#pragma once

#if !defined(__CUDACC__) && !defined(ATTNKIT_CUDA_EMULATION)
#error "attnkit/cuda headers contain CUDA kernels: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cmath>
#include <cstddef>

#include "attnkit/core/host_device.hpp"
#include "attnkit/cuda/core.cuh"
#include "attnkit/cuda/elements.cuh"
#include "attnkit/kernels/linear_math.hpp"

namespace attnkit::cuda::detail {

inline constexpr int linear_threads = 128;
inline constexpr index_t linear_rows = 16;  // positions per chunk

// The feature maps as the kernels see them (the values of attnkit::feature_map).
enum class linear_phi : int { identity = 0, elu_plus_one = 1, relu = 2, cosine = 3, favor_positive = 4 };

// Everything a linear kernel needs, by value. Strides in elements, logical axis order.
struct linear_args {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  index_t qs[4]{}, ks[4]{}, vs[4]{}, os[4]{};
  index_t batch = 0, q_len = 0, kv_len = 0, q_heads = 0, kv_heads = 0, group = 1;
  index_t head_dim = 0, features = 0, value_dim = 0;
  index_t dv_tile = 8;  // value columns per block
  linear_phi phi = linear_phi::elu_plus_one;
  bool normalize = true;
  double eps = 0, log_eps = 0;
  double half_scale = 0, half_log_m = 0;  // FAVOR+: scale / 2 and log(m) / 2
  const float* decay = nullptr;           // device, one gamma per query head (causal), or null
  const void* wt = nullptr;               // FAVOR+: device Acc [head_dim][features] = sqrt(scale) W^T
  void* state = nullptr;                  // non-causal: device Acc workspace, see linear_state_layout
};

// Shared memory of a linear block, offsets in accumulator elements.
struct linear_smem {
  index_t qf, kf, v, s, z, kmax, p, pw, row_tmp, row_stab, row_den, total;
};

ATTNKIT_HOST_DEVICE inline linear_smem make_linear_smem(index_t features, index_t dv_tile) {
  constexpr index_t C = linear_rows;
  linear_smem l{};
  index_t o = 0;
  l.qf = o, o += C * features;        // phi(Q chunk)
  l.kf = o, o += C * features;        // phi(K chunk)
  l.v = o, o += C * dv_tile;          // V chunk, this block's columns
  l.s = o, o += features * dv_tile;   // state S, this block's columns
  l.z = o, o += features;             // normalizer z
  l.kmax = o, o += features;          // FAVOR+ K_f
  l.p = o, o += C * C;                // decayed scores
  l.pw = o, o += C + 1;               // gamma^n
  l.row_tmp = o, o += C;              // per-row |x'|^2 / 2 or 1 / |x|
  l.row_stab = o, o += C;             // per-row query stabilizer A_i
  l.row_den = o, o += C;              // per-row denominator
  l.total = o;
  return l;
}

// Non-causal workspace per (batch, kv head): S [features][value_dim], then z and K [features].
struct linear_state_layout {
  index_t per_head, s, z, kmax;
};
ATTNKIT_HOST_DEVICE inline linear_state_layout make_linear_state_layout(index_t features, index_t value_dim) {
  return {features * value_dim + 2 * features, 0, features * value_dim, features * value_dim + features};
}

template <class Acc>
__device__ __forceinline__ Acc lin_max_ignoring_nan(Acc m, Acc x) {
  return x > m ? x : m;
}

// Views of one block's shared memory.
template <class Acc>
struct linear_block {
  Acc *qf, *kf, *v, *s, *z, *kmax, *p, *pw, *row_tmp, *row_stab, *row_den;
  __device__ explicit linear_block(unsigned char* raw, const linear_smem& l) {
    Acc* base = reinterpret_cast<Acc*>(raw);
    qf = base + l.qf, kf = base + l.kf, v = base + l.v, s = base + l.s, z = base + l.z, kmax = base + l.kmax;
    p = base + l.p, pw = base + l.pw, row_tmp = base + l.row_tmp, row_stab = base + l.row_stab;
    row_den = base + l.row_den;
  }
};

// FAVOR+ raw logits of n rows into dst (row stride F): dst[r][f] = (W x'_r)_f - |x'_r|^2 / 2 + add[f]
// (add may be null). row_tmp receives |x'_r|^2 / 2.
template <class Acc, class T>
__device__ void favor_logits(const linear_args& a, const strided4<const storage_t<T>>& x, index_t b, index_t t0,
                             index_t n, index_t head, Acc* dst, const Acc* add, Acc* row_tmp) {
  const index_t D = a.head_dim, F = a.features;
  const Acc* wt = static_cast<const Acc*>(a.wt);
  for (index_t r = threadIdx.x; r < n; r += linear_threads) {
    Acc sq = 0;
    for (index_t d = 0; d < D; ++d) {
      const Acc y = load_as<Acc, T>(x.at(b, t0 + r, head, d));
      sq += y * y;
    }
    row_tmp[r] = Acc(a.half_scale) * sq;
  }
  __syncthreads();
  for (index_t e = threadIdx.x; e < n * F; e += linear_threads) {
    const index_t r = e / F, f = e % F;
    const storage_t<T>* row = x.at(b, t0 + r, head, 0);
    Acc u = 0;
    for (index_t d = 0; d < D; ++d) u += load_as<Acc, T>(row + d * x.s[3]) * wt[d * F + f];
    dst[e] = u - row_tmp[r] + (add != nullptr ? add[f] : Acc(0));
  }
  __syncthreads();
}

// The elementwise maps (and cosine) of n rows into dst (row stride F = head_dim).
template <class Acc, class T>
__device__ void plain_features(const linear_args& a, const strided4<const storage_t<T>>& x, index_t b, index_t t0,
                               index_t n, index_t head, Acc* dst, Acc* row_tmp) {
  const index_t F = a.features;
  for (index_t e = threadIdx.x; e < n * F; e += linear_threads) {
    const index_t r = e / F, d = e % F;
    const Acc y = load_as<Acc, T>(x.at(b, t0 + r, head, d));
    Acc f = y;
    if (a.phi == linear_phi::elu_plus_one) f = kernels::elu_plus_one(y);
    if (a.phi == linear_phi::relu) f = kernels::relu(y);
    dst[e] = f;
  }
  __syncthreads();
  if (a.phi != linear_phi::cosine) return;
  for (index_t r = threadIdx.x; r < n; r += linear_threads) {
    Acc sq = 0;
    for (index_t d = 0; d < F; ++d) sq += dst[r * F + d] * dst[r * F + d];
    row_tmp[r] = sq == Acc(0) ? Acc(0) : Acc(1) / sqrt(sq);
  }
  __syncthreads();
  for (index_t e = threadIdx.x; e < n * F; e += linear_threads) dst[e] *= row_tmp[e / F];
  __syncthreads();
}

// phi of key rows [t0, t0 + n) into blk.kf. FAVOR+: first raises K_f to the chunk's maximum and
// rescales the state rows (S over `cols` columns, and z) of every feature whose maximum grew.
template <class Acc, class T>
__device__ void key_features(const linear_args& a, const strided4<const storage_t<T>>& k, index_t b, index_t t0,
                             index_t n, index_t hk, linear_block<Acc>& blk, index_t cols) {
  const index_t F = a.features;
  if (a.phi != linear_phi::favor_positive) return plain_features<Acc, T>(a, k, b, t0, n, hk, blk.kf, blk.row_tmp);
  favor_logits<Acc, T>(a, k, b, t0, n, hk, blk.kf, nullptr, blk.row_tmp);
  const Acc ninf = -Acc(INFINITY);
  for (index_t f = threadIdx.x; f < F; f += linear_threads) {
    Acc m = ninf;
    for (index_t r = 0; r < n; ++r) m = lin_max_ignoring_nan(m, blk.kf[r * F + f]);
    const Acc old = blk.kmax[f];
    if (m > old) {
      const Acc factor = kernels::linear_exp(old - m);  // 0 when nothing was accumulated (old = -inf)
      for (index_t c = 0; c < cols; ++c) blk.s[f * cols + c] *= factor;
      blk.z[f] *= factor;
      blk.kmax[f] = m;
    }
  }
  __syncthreads();
  for (index_t e = threadIdx.x; e < n * F; e += linear_threads) {
    const Acc kf = blk.kmax[e % F], l = blk.kf[e];
    // K_f = -inf: every logit of the feature so far is -inf or NaN; keep NaN, else 0.
    blk.kf[e] = kf == ninf ? (l != l ? l : Acc(0)) : kernels::linear_exp(l - kf - Acc(a.half_log_m));
  }
  __syncthreads();
}

// phi of query rows [t0, t0 + n) into blk.qf and their stabilizers into blk.row_stab (0 unless
// FAVOR+, which uses blk.kmax as it stands).
template <class Acc, class T>
__device__ void query_features(const linear_args& a, const strided4<const storage_t<T>>& q, index_t b, index_t t0,
                               index_t n, index_t h, linear_block<Acc>& blk) {
  const index_t F = a.features;
  if (a.phi != linear_phi::favor_positive) {
    plain_features<Acc, T>(a, q, b, t0, n, h, blk.qf, blk.row_tmp);
    for (index_t r = threadIdx.x; r < n; r += linear_threads) blk.row_stab[r] = 0;
    __syncthreads();
    return;
  }
  favor_logits<Acc, T>(a, q, b, t0, n, h, blk.qf, blk.kmax, blk.row_tmp);
  const Acc ninf = -Acc(INFINITY);
  for (index_t r = threadIdx.x; r < n; r += linear_threads) {
    Acc m = ninf;
    for (index_t f = 0; f < F; ++f) m = lin_max_ignoring_nan(m, blk.qf[r * F + f]);
    blk.row_stab[r] = m;
  }
  __syncthreads();
  for (index_t e = threadIdx.x; e < n * F; e += linear_threads) {
    const Acc m = blk.row_stab[e / F], x = blk.qf[e];
    blk.qf[e] = m == ninf ? (x != x ? x : Acc(0)) : kernels::linear_exp(x - m - Acc(a.half_log_m));
  }
  __syncthreads();
}

// Rows [t0, t0 + n) of v, columns [d0, d0 + cols) (zeros past value_dim), into blk.v.
template <class Acc, class T>
__device__ void load_values(const linear_args& a, const strided4<const storage_t<T>>& v, index_t b, index_t t0,
                            index_t n, index_t hk, index_t d0, index_t cols, linear_block<Acc>& blk) {
  for (index_t e = threadIdx.x; e < n * cols; e += linear_threads) {
    const index_t r = e / cols, c = e % cols;
    blk.v[e] = d0 + c < a.value_dim ? load_as<Acc, T>(v.at(b, t0 + r, hk, d0 + c)) : Acc(0);
  }
  __syncthreads();
}

// S <- gamma^n S + sum_j gamma^(n-1-j) kf_j v_j^T and z <- gamma^n z + sum_j gamma^(n-1-j) kf_j.
template <class Acc>
__device__ void update_state(index_t F, index_t n, index_t cols, linear_block<Acc>& blk) {
  for (index_t e = threadIdx.x; e < F * cols + F; e += linear_threads) {
    if (e < F * cols) {
      const index_t f = e / cols, c = e % cols;
      Acc acc = blk.pw[n] * blk.s[e];
      for (index_t j = 0; j < n; ++j) acc += blk.pw[n - 1 - j] * blk.kf[j * F + f] * blk.v[j * cols + c];
      blk.s[e] = acc;
    } else {
      const index_t f = e - F * cols;
      Acc acc = blk.pw[n] * blk.z[f];
      for (index_t j = 0; j < n; ++j) acc += blk.pw[n - 1 - j] * blk.kf[j * F + f];
      blk.z[f] = acc;
    }
  }
  __syncthreads();
}

// Zero state, K_f = -inf (FAVOR+) or 0, gamma^n for n <= linear_rows.
template <class Acc>
__device__ void init_block(const linear_args& a, index_t cols, Acc gamma, linear_block<Acc>& blk) {
  const index_t F = a.features;
  for (index_t e = threadIdx.x; e < F * cols; e += linear_threads) blk.s[e] = 0;
  for (index_t f = threadIdx.x; f < F; f += linear_threads) {
    blk.z[f] = 0;
    blk.kmax[f] = a.phi == linear_phi::favor_positive ? -Acc(INFINITY) : Acc(0);
  }
  if (threadIdx.x == 0) {
    blk.pw[0] = 1;
    for (index_t i = 1; i <= linear_rows; ++i) blk.pw[i] = blk.pw[i - 1] * gamma;
  }
  __syncthreads();
}

template <class Acc, class TO>
__device__ __forceinline__ void store_output(const linear_args& a, const strided4<storage_t<TO>>& out, index_t b,
                                             index_t t, index_t h, index_t d, Acc num, Acc den, Acc stab) {
  const Acc f = kernels::linear_output_factor<Acc>(a.normalize, a.phi == linear_phi::favor_positive, Acc(a.eps),
                                                   Acc(a.log_eps), den, stab);
  *out.at(b, t, h, d) = static_cast<TO>(num * f);
}

template <class Acc, class TQ, class TK, class TV, class TO>
__global__ void __launch_bounds__(linear_threads) linear_causal_kernel(const linear_args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const index_t F = a.features, cols = a.dv_tile, C = linear_rows;
  linear_block<Acc> blk(smem_raw, make_linear_smem(F, cols));
  const index_t b = static_cast<index_t>(blockIdx.x) / a.q_heads, h = static_cast<index_t>(blockIdx.x) % a.q_heads;
  const index_t hk = h / a.group, d0 = static_cast<index_t>(blockIdx.y) * cols;
  const strided4<const storage_t<TQ>> q{static_cast<const storage_t<TQ>*>(a.q), {a.qs[0], a.qs[1], a.qs[2], a.qs[3]}};
  const strided4<const storage_t<TK>> k{static_cast<const storage_t<TK>*>(a.k), {a.ks[0], a.ks[1], a.ks[2], a.ks[3]}};
  const strided4<const storage_t<TV>> v{static_cast<const storage_t<TV>*>(a.v), {a.vs[0], a.vs[1], a.vs[2], a.vs[3]}};
  const strided4<storage_t<TO>> out{static_cast<storage_t<TO>*>(a.out), {a.os[0], a.os[1], a.os[2], a.os[3]}};
  init_block<Acc>(a, cols, a.decay != nullptr ? Acc(a.decay[h]) : Acc(1), blk);

  for (index_t t0 = 0; t0 < a.q_len; t0 += C) {
    const index_t n = a.q_len - t0 < C ? a.q_len - t0 : C;
    key_features<Acc, TK>(a, k, b, t0, n, hk, blk, cols);
    load_values<Acc, TV>(a, v, b, t0, n, hk, d0, cols, blk);
    query_features<Acc, TQ>(a, q, b, t0, n, h, blk);
    // Decayed scores of the lower triangle only.
    for (index_t e = threadIdx.x; e < n * n; e += linear_threads) {
      const index_t i = e / n, j = e % n;
      if (j > i) continue;
      Acc acc = 0;
      for (index_t f = 0; f < F; ++f) acc += blk.qf[i * F + f] * blk.kf[j * F + f];
      blk.p[i * C + j] = blk.pw[i - j] * acc;
    }
    __syncthreads();
    for (index_t i = threadIdx.x; i < n; i += linear_threads) {
      Acc acc = 0;
      for (index_t f = 0; f < F; ++f) acc += blk.qf[i * F + f] * blk.z[f];
      acc *= blk.pw[i + 1];
      for (index_t j = 0; j <= i; ++j) acc += blk.p[i * C + j];
      blk.row_den[i] = acc;
    }
    __syncthreads();
    for (index_t e = threadIdx.x; e < n * cols; e += linear_threads) {
      const index_t i = e / cols, c = e % cols;
      if (d0 + c >= a.value_dim) continue;
      Acc acc = 0;
      for (index_t f = 0; f < F; ++f) acc += blk.qf[i * F + f] * blk.s[f * cols + c];
      acc *= blk.pw[i + 1];
      for (index_t j = 0; j <= i; ++j) acc += blk.p[i * C + j] * blk.v[j * cols + c];
      store_output<Acc, TO>(a, out, b, t0 + i, h, d0 + c, acc, blk.row_den[i], blk.row_stab[i]);
    }
    __syncthreads();
    update_state<Acc>(F, n, cols, blk);
  }
}

// Non-causal, pass 1: S and z (and K_f) of one (batch, kv head) over all keys, columns
// [d0, d0 + dv_tile), into the workspace.
template <class Acc, class TK, class TV>
__global__ void __launch_bounds__(linear_threads) linear_state_kernel(const linear_args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const index_t F = a.features, cols = a.dv_tile, C = linear_rows;
  linear_block<Acc> blk(smem_raw, make_linear_smem(F, cols));
  const index_t b = static_cast<index_t>(blockIdx.x) / a.kv_heads, hk = static_cast<index_t>(blockIdx.x) % a.kv_heads;
  const index_t d0 = static_cast<index_t>(blockIdx.y) * cols;
  const strided4<const storage_t<TK>> k{static_cast<const storage_t<TK>*>(a.k), {a.ks[0], a.ks[1], a.ks[2], a.ks[3]}};
  const strided4<const storage_t<TV>> v{static_cast<const storage_t<TV>*>(a.v), {a.vs[0], a.vs[1], a.vs[2], a.vs[3]}};
  init_block<Acc>(a, cols, Acc(1), blk);
  for (index_t t0 = 0; t0 < a.kv_len; t0 += C) {
    const index_t n = a.kv_len - t0 < C ? a.kv_len - t0 : C;
    key_features<Acc, TK>(a, k, b, t0, n, hk, blk, cols);
    load_values<Acc, TV>(a, v, b, t0, n, hk, d0, cols, blk);
    update_state<Acc>(F, n, cols, blk);
  }
  const linear_state_layout sl = make_linear_state_layout(F, a.value_dim);
  Acc* ws = static_cast<Acc*>(a.state) + (b * a.kv_heads + hk) * sl.per_head;
  for (index_t e = threadIdx.x; e < F * cols; e += linear_threads) {
    const index_t f = e / cols, c = e % cols;
    if (d0 + c < a.value_dim) ws[sl.s + f * a.value_dim + d0 + c] = blk.s[e];
  }
  if (blockIdx.y == 0)
    for (index_t f = threadIdx.x; f < F; f += linear_threads) {
      ws[sl.z + f] = blk.z[f];
      ws[sl.kmax + f] = blk.kmax[f];
    }
}

// Non-causal, pass 2: out for query rows [chunk * linear_rows, ...) of one (batch, query head),
// columns [d0, d0 + dv_tile), from the state of its kv head.
template <class Acc, class TQ, class TO>
__global__ void __launch_bounds__(linear_threads) linear_query_kernel(const linear_args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const index_t F = a.features, cols = a.dv_tile, C = linear_rows;
  linear_block<Acc> blk(smem_raw, make_linear_smem(F, cols));
  const index_t chunks = (a.q_len + C - 1) / C;
  const index_t bh = static_cast<index_t>(blockIdx.x) / chunks, t0 = (static_cast<index_t>(blockIdx.x) % chunks) * C;
  const index_t b = bh / a.q_heads, h = bh % a.q_heads, hk = h / a.group;
  const index_t d0 = static_cast<index_t>(blockIdx.y) * cols, n = a.q_len - t0 < C ? a.q_len - t0 : C;
  const strided4<const storage_t<TQ>> q{static_cast<const storage_t<TQ>*>(a.q), {a.qs[0], a.qs[1], a.qs[2], a.qs[3]}};
  const strided4<storage_t<TO>> out{static_cast<storage_t<TO>*>(a.out), {a.os[0], a.os[1], a.os[2], a.os[3]}};
  const linear_state_layout sl = make_linear_state_layout(F, a.value_dim);
  const Acc* ws = static_cast<const Acc*>(a.state) + (b * a.kv_heads + hk) * sl.per_head;
  for (index_t e = threadIdx.x; e < F * cols; e += linear_threads) {
    const index_t f = e / cols, c = e % cols;
    blk.s[e] = d0 + c < a.value_dim ? ws[sl.s + f * a.value_dim + d0 + c] : Acc(0);
  }
  for (index_t f = threadIdx.x; f < F; f += linear_threads) {
    blk.z[f] = ws[sl.z + f];
    blk.kmax[f] = ws[sl.kmax + f];
  }
  __syncthreads();
  query_features<Acc, TQ>(a, q, b, t0, n, h, blk);
  for (index_t i = threadIdx.x; i < n; i += linear_threads) {
    Acc acc = 0;
    for (index_t f = 0; f < F; ++f) acc += blk.qf[i * F + f] * blk.z[f];
    blk.row_den[i] = acc;
  }
  __syncthreads();
  for (index_t e = threadIdx.x; e < n * cols; e += linear_threads) {
    const index_t i = e / cols, c = e % cols;
    if (d0 + c >= a.value_dim) continue;
    Acc acc = 0;
    for (index_t f = 0; f < F; ++f) acc += blk.qf[i * F + f] * blk.s[f * cols + c];
    store_output<Acc, TO>(a, out, b, t0 + i, h, d0 + c, acc, blk.row_den[i], blk.row_stab[i]);
  }
}

}  // namespace attnkit::cuda::detail
