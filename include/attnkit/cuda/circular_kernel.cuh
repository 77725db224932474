// Circular-convolutional attention (CAT, ops/circular.hpp) kernels around cuFFT. Per pass over a
// group of heads (see circular_plan.cuh):
//   circular_softmax_kernel   one block per head: softmax weights as a real filter of transform
//                             length M (scaled by 1/M, zero padded), and for causal + renormalize the
//                             per-row factors total / prefix mass; per-head status.
//   circular_pack_kernel      v -> one real row of M per (head, channel), zero padded; non-finite
//                             values are replaced by 0 and the first one's position is recorded.
//   (cuFFT R2C of filters and values)
//   circular_multiply_kernel  value spectra times the head's filter spectrum.
//   (cuFFT C2R)
//   circular_unpack_kernel    rows [top_begin, N) of out from the transforms (folded modulo N for the
//                             non-causal linear form, times the renormalization factor), then NaN
//                             where a non-finite value reaches.
//   circular_direct_kernel    causal + renormalize only: rows [0, solve_rows) by direct sums in double
//                             (row i: softmax over logits[0..i] alone), and NaN rows after a NaN or
//                             +inf logit.
// Arithmetic as on the CPU: logits and values as float, exp in float, weight sums in double, the
// transform in float. The rows whose prefix mass is below 1/8 of the head's total are summed directly
// (O(R^2 D) for R such rows: R is about N/8 for random logits, up to N for steeply rising ones)
// instead of the CPU's recursive FFT pieces.
#pragma once

#if !defined(__CUDACC__) && !defined(ATTNKIT_CUDA_EMULATION)
#error "attnkit/cuda headers contain CUDA kernels: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "attnkit/cuda/core.cuh"
#include "attnkit/cuda/elements.cuh"

namespace attnkit::cuda::detail {

inline constexpr int circular_threads = 256;
inline constexpr double circular_renorm_tau = 1.0 / 8;  // as ops/circular.hpp

// What the softmax kernel found out about a head.
struct circular_head {
  index_t top_begin = 0;   // unpack writes rows [top_begin, N)
  index_t solve_rows = 0;  // renormalize: the direct kernel writes rows [0, solve_rows)
  int poison_tail = 0;     // renormalize: rows [solve_rows, N) are NaN (a NaN or +inf logit)
};

struct circular_args {
  const void* logits = nullptr;
  index_t ls[3]{};  // (batch, head, seq)
  const void* v = nullptr;
  index_t vs[4]{};
  void* out = nullptr;
  index_t os[4]{};
  index_t heads = 0, seq = 0, dim = 0;
  index_t M = 0, row = 0;        // transform length; floats per padded row, 2 (M / 2 + 1)
  index_t fold = 0;              // non-causal linear form: out[i] = y[i] + y[i + N]; 0 otherwise
  bool causal = false, renorm = false;
  index_t head0 = 0;             // first (batch * heads + head) of this pass
  index_t pass_heads = 0;        // heads in this pass
  float* filters = nullptr;      // [pass_heads][row]
  float* values = nullptr;       // [pass_heads * dim][row]
  float* factors = nullptr;      // renormalize: [pass_heads][seq]
  circular_head* info = nullptr;                // [pass_heads]
  unsigned long long* first_bad = nullptr;      // [pass_heads * dim]: first non-finite row of v, or seq
};

__device__ __forceinline__ float cat_exp(float x) { return expf(x); }
__device__ __forceinline__ double cat_exp(double x) { return exp(x); }

// Block-wide reductions over circular_threads threads through `red` (circular_threads elements);
// every thread gets the result. Fixed tree order: deterministic.
template <class T, class Op>
__device__ T block_reduce(T x, T* red, Op op) {
  red[threadIdx.x] = x;
  __syncthreads();
  for (int w = circular_threads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) red[threadIdx.x] = op(red[threadIdx.x], red[threadIdx.x + w]);
    __syncthreads();
  }
  const T r = red[0];
  __syncthreads();
  return r;
}

template <class TL>
__device__ __forceinline__ float logit_at(const circular_args& a, index_t bh, index_t j) {
  const auto* l = static_cast<const storage_t<TL>*>(a.logits);
  return load_as<float, TL>(l + (bh / a.heads) * a.ls[0] + (bh % a.heads) * a.ls[1] + j * a.ls[2]);
}

// One block per head of the pass. Dynamic shared memory: circular_threads doubles.
template <class TL>
__global__ void __launch_bounds__(circular_threads) circular_softmax_kernel(const circular_args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* red = reinterpret_cast<double*>(smem_raw);
  const index_t p = blockIdx.x, bh = a.head0 + p, N = a.seq, T = circular_threads;
  const float finf = INFINITY;
  float* w = a.filters + p * a.row;
  for (index_t d = threadIdx.x; d < a.dim; d += T) a.first_bad[p * a.dim + d] = static_cast<unsigned long long>(N);

  // First NaN or +inf logit, and the maximum.
  double bad = double(N), mx = -double(INFINITY);
  for (index_t j = threadIdx.x; j < N; j += T) {
    const float l = logit_at<TL>(a, bh, j);
    if ((l != l || l == finf) && double(j) < bad) bad = double(j);
    if (l > mx) mx = l;
  }
  const auto min_op = [](double x, double y) { return x < y ? x : y; };
  const index_t first_bad = static_cast<index_t>(block_reduce(bad, red, min_op));
  const float G = static_cast<float>(block_reduce(mx, red, [](double x, double y) { return x > y ? x : y; }));

  circular_head info;
  info.top_begin = 0;
  if (first_bad < N || G == -finf) {
    // A NaN / +inf logit makes the head NaN (renormalize: the rows from it on, the direct kernel
    // gives the others); all -inf gives 0 (renormalize: the direct kernel leaves zeros).
    const float fill = !a.renorm && first_bad < N ? NAN : 0.f;
    for (index_t j = threadIdx.x; j < a.row; j += T) w[j] = j < N ? fill : 0.f;
    if (a.renorm) info.top_begin = N, info.solve_rows = first_bad, info.poison_tail = first_bad < N;
    if (threadIdx.x == 0) a.info[p] = info;
    return;
  }
  // Weights exp(l - G) in float, their sum in double (each thread a strided partial, then the tree).
  double part = 0;
  for (index_t j = threadIdx.x; j < N; j += T) part += cat_exp(logit_at<TL>(a, bh, j) - G);
  const double sum = block_reduce(part, red, [](double x, double y) { return x + y; });
  const float ws = static_cast<float>(1.0 / static_cast<double>(a.M) / sum);
  for (index_t j = threadIdx.x; j < a.row; j += T)
    w[j] = j < N ? cat_exp(logit_at<TL>(a, bh, j) - G) * ws : 0.f;

  if (a.renorm) {
    // Prefix masses: thread t scans the contiguous segment [t * seg, (t + 1) * seg) twice (its total,
    // then the running sums from the offset of the segments before it).
    const index_t seg = (N + T - 1) / T, j0 = threadIdx.x * seg, j1 = j0 + seg < N ? j0 + seg : N;
    double tot = 0;
    for (index_t j = j0; j < j1; ++j) tot += cat_exp(logit_at<TL>(a, bh, j) - G);
    red[threadIdx.x] = tot;
    __syncthreads();
    double off = 0;
    for (index_t t = 0; t < static_cast<index_t>(threadIdx.x); ++t) off += red[t];
    __syncthreads();
    double c = off, first = double(N);
    for (index_t j = j0; j < j1; ++j) {
      c += cat_exp(logit_at<TL>(a, bh, j) - G);
      if (c >= circular_renorm_tau * sum && double(j) < first) first = double(j);
      a.factors[p * N + j] = static_cast<float>(sum / c);
    }
    const index_t i0 = static_cast<index_t>(block_reduce(first, red, min_op));
    info.top_begin = i0, info.solve_rows = i0, info.poison_tail = 0;
  }
  if (threadIdx.x == 0) a.info[p] = info;
}

// Dynamic shared memory of the pack and unpack kernels: a 32 x 32 tile, rows padded to 33 floats.
inline constexpr std::size_t circular_tile_smem = 32 * 33 * sizeof(float);

// Real rows of `row` floats per (head, channel): v[b, t, h, c] for t < N, 0 up to the padding.
// Blocks of 32 positions x 32 channels, transposed through shared memory.
template <class TV>
__global__ void __launch_bounds__(circular_threads) circular_pack_kernel(const circular_args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto tile = reinterpret_cast<float(*)[33]>(smem_raw);
  const index_t ctiles = (a.dim + 31) / 32;  // grid: x = position tiles, y = (head, channel tile)
  const index_t p = static_cast<index_t>(blockIdx.y) / ctiles, c0 = (static_cast<index_t>(blockIdx.y) % ctiles) * 32;
  const index_t t0 = static_cast<index_t>(blockIdx.x) * 32, bh = a.head0 + p, b = bh / a.heads, h = bh % a.heads;
  const int tx = static_cast<int>(threadIdx.x) % 32, ty = static_cast<int>(threadIdx.x) / 32;
  const auto* v = static_cast<const storage_t<TV>*>(a.v);
  for (int r = ty; r < 32; r += circular_threads / 32) {  // r: position, tx: channel (coalesced reads)
    const index_t t = t0 + r, c = c0 + tx;
    float x = 0.f;
    if (t < a.seq && c < a.dim) {
      x = load_as<float, TV>(v + b * a.vs[0] + t * a.vs[1] + h * a.vs[2] + c * a.vs[3]);
      if (x - x != 0.f) {  // inf or NaN
        atomicMin(a.first_bad + p * a.dim + c, static_cast<unsigned long long>(t));
        x = 0.f;
      }
    }
    tile[r][tx] = x;
  }
  __syncthreads();
  for (int r = ty; r < 32; r += circular_threads / 32) {  // r: channel, tx: position (coalesced writes)
    const index_t c = c0 + r, t = t0 + tx;
    if (c < a.dim && t < a.row) a.values[(p * a.dim + c) * a.row + t] = tile[tx][r];
  }
}

// Value spectra (M / 2 + 1 complex numbers per row) times their head's filter spectrum. Grid: x =
// rows (pass_heads * dim), y = blocks of circular_threads frequencies.
__global__ void __launch_bounds__(circular_threads) circular_multiply_kernel(const circular_args a) {
  const index_t r = blockIdx.x, k = static_cast<index_t>(blockIdx.y) * circular_threads + threadIdx.x;
  if (k > a.M / 2) return;
  const float* f = a.filters + (r / a.dim) * a.row + 2 * k;
  float* x = a.values + r * a.row + 2 * k;
  const float xr = x[0], xi = x[1];
  x[0] = xr * f[0] - xi * f[1];
  x[1] = xr * f[1] + xi * f[0];
}

// out rows [top_begin, N) from the inverse transforms, transposed back through shared memory.
template <class TO>
__global__ void __launch_bounds__(circular_threads) circular_unpack_kernel(const circular_args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto tile = reinterpret_cast<float(*)[33]>(smem_raw);
  const index_t ctiles = (a.dim + 31) / 32;  // grid: x = position tiles, y = (head, channel tile)
  const index_t p = static_cast<index_t>(blockIdx.y) / ctiles, c0 = (static_cast<index_t>(blockIdx.y) % ctiles) * 32;
  const index_t t0 = static_cast<index_t>(blockIdx.x) * 32, bh = a.head0 + p, b = bh / a.heads, h = bh % a.heads;
  const int tx = static_cast<int>(threadIdx.x) % 32, ty = static_cast<int>(threadIdx.x) / 32;
  const index_t top = a.info[p].top_begin;
  for (int r = ty; r < 32; r += circular_threads / 32) {  // r: channel, tx: position
    const index_t c = c0 + r, t = t0 + tx;
    float y = 0.f;
    if (c < a.dim && t < a.seq) {
      const float* row = a.values + (p * a.dim + c) * a.row;
      y = row[t];
      if (a.fold > 0 && t + a.fold < a.M) y += row[t + a.fold];
      if (a.renorm) y *= a.factors[p * a.seq + t];
    }
    tile[r][tx] = y;
  }
  __syncthreads();
  auto* out = static_cast<storage_t<TO>*>(a.out);
  for (int r = ty; r < 32; r += circular_threads / 32) {  // r: position, tx: channel
    const index_t t = t0 + r, c = c0 + tx;
    if (t >= a.seq || c >= a.dim || t < top) continue;
    const unsigned long long bad = a.first_bad[p * a.dim + c];
    // A non-finite value at row j reaches every row (non-causal) or the rows i >= j (causal).
    const bool poisoned = bad < static_cast<unsigned long long>(a.seq) &&
                          (!a.causal || static_cast<unsigned long long>(t) >= bad);
    out[b * a.os[0] + t * a.os[1] + h * a.os[2] + c * a.os[3]] =
        static_cast<storage_t<TO>>(poisoned ? NAN : tile[tx][r]);
  }
}

// causal + renormalize: one block per (row, head of the pass). Rows < solve_rows: the softmax over
// logits[0..i] applied directly, in double; rows >= solve_rows after a NaN / +inf logit: NaN.
// Dynamic shared memory: circular_threads doubles.
template <class TL, class TV, class TO>
__global__ void __launch_bounds__(circular_threads) circular_direct_kernel(const circular_args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* e = reinterpret_cast<double*>(smem_raw);
  const index_t i = blockIdx.x, p = blockIdx.y, bh = a.head0 + p, b = bh / a.heads, h = bh % a.heads;
  const circular_head info = a.info[p];
  auto* out = static_cast<storage_t<TO>*>(a.out) + b * a.os[0] + i * a.os[1] + h * a.os[2];
  if (i >= info.solve_rows) {
    if (info.poison_tail)
      for (index_t c = threadIdx.x; c < a.dim; c += circular_threads)
        out[c * a.os[3]] = static_cast<storage_t<TO>>(NAN);
    return;
  }
  const auto* v = static_cast<const storage_t<TV>*>(a.v) + b * a.vs[0] + h * a.vs[2];
  double mx = -double(INFINITY);
  for (index_t m = threadIdx.x; m <= i; m += circular_threads) {
    const double l = logit_at<TL>(a, bh, m);
    if (l > mx) mx = l;
  }
  mx = block_reduce(mx, e, [](double x, double y) { return x > y ? x : y; });
  // Each thread owns channels c = threadIdx.x + k * circular_threads, at most 4 (dim <= 1024 here,
  // larger dims loop over the rows again).
  for (index_t c0 = 0; c0 < a.dim; c0 += 4 * circular_threads) {
    double acc[4] = {0, 0, 0, 0}, den = 0;
    for (index_t m0 = 0; m0 <= i; m0 += circular_threads) {
      const index_t m = m0 + threadIdx.x;
      __syncthreads();
      e[threadIdx.x] = m <= i && mx > -double(INFINITY) ? exp(double(logit_at<TL>(a, bh, m)) - mx) : 0.0;
      __syncthreads();
      const index_t n = i - m0 + 1 < circular_threads ? i - m0 + 1 : circular_threads;
      for (index_t k = 0; k < n; ++k) {
        den += e[k];
        for (int u = 0; u < 4; ++u) {
          const index_t c = c0 + u * circular_threads + threadIdx.x;
          if (c < a.dim) acc[u] += e[k] * double(load_as<float, TV>(v + (i - m0 - k) * a.vs[1] + c * a.vs[3]));
        }
      }
    }
    for (int u = 0; u < 4; ++u) {
      const index_t c = c0 + u * circular_threads + threadIdx.x;
      if (c < a.dim) out[c * a.os[3]] = static_cast<storage_t<TO>>(den > 0 ? acc[u] / den : 0.0);
    }
  }
}

}  // namespace attnkit::cuda::detail
