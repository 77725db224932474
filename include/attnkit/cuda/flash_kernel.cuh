// Flash attention forward kernel (tiled online softmax) and the kernels that merge partial results.
// One kernel template serves every element type and head dim: flash_config picks the tiles, and
// only the two tile products (S = Q K^T and O += P V) differ between the tensor-core path (bf16,
// f16: mma.sync m16n8k16) and the FMA path (float, double). Both paths give every thread the same
// fragment of S and O (the mma.sync accumulator layout, see mma.cuh), so masking, the online
// softmax and the epilogue are written once.
//
// Work decomposition. The query rows that share one kv head are packed: row r of kv head hk is
// query i = r / group of query head hk * group + r % group. A block owns block_m consecutive packed
// rows of one (batch, kv head) and walks the keys in tiles of block_n, so with grouped-query
// attention each K/V tile is loaded once for all query heads of its group (decode with Nq = 1 and
// group 4 fills 4 rows of one block instead of 4 blocks). Warp w owns rows 16w..16w+15 of the block;
// lane (g = lane / 4, t = lane % 4) owns rows g and g + 8 of its warp, keys 8n + 2t, 8n + 2t + 1 of
// each 8-key column tile n of S, and columns 8c + 2t, 8c + 2t + 1 of each 8-wide tile c of O.
//
// Split-KV (Flash-Decoding): with few rows per (batch, kv head) the grid gets a second dimension
// that cuts the keys into chunks of split_keys (a multiple of block_n). Each chunk writes its
// normalised partial output and log-sum-exp to a workspace, and merge_splits_kernel combines the
// chunks of a row in fixed order, so results do not depend on scheduling.
#pragma once

#if !defined(__CUDACC__) && !defined(ATTNKIT_CUDA_EMULATION)
#error "attnkit/cuda headers contain CUDA kernels: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "attnkit/cuda/core.cuh"
#include "attnkit/cuda/mma.cuh"
#include "attnkit/kernels/online_softmax.hpp"
#include "attnkit/kernels/softmax_state.hpp"

namespace attnkit::cuda::detail {

// ---- tile configuration -------------------------------------------------------------------------

struct tile_shape {
  int warps, block_n;
};

// Shared memory holds one Q tile (16 * warps rows) and one K and one V tile (block_n rows each),
// rows of `stride` elements. Preference order: 4 warps; block_n as large as 64 while the S and O
// fragments stay within a register budget (block_n * head_dim <= 64 * 128) and the tiles fit in
// 80 KiB (two blocks per SM on an A100); else the 99 KiB that every sm_80+ GPU lets one block opt
// in to (sm_86/sm_89 have the least); else a single warp (double with head dim 256).
constexpr tile_shape choose_tiles(std::size_t elem_bytes, int stride, int head_dim) {
  const std::size_t limits[2] = {80 * 1024, 99 * 1024};
  const int warp_options[2] = {4, 1};
  const int bn_options[3] = {64, 32, 16};
  for (int w : warp_options)
    for (std::size_t limit : limits)
      for (int bn : bn_options)
        if (bn * head_dim <= 64 * 128 &&
            static_cast<std::size_t>(16 * w + 2 * bn) * static_cast<std::size_t>(stride) * elem_bytes <=
                limit)
          return {w, bn};
  return {0, 0};
}

template <class T, int HeadDim>
struct flash_config {
  using element = T;
  using elem = typename element_traits<T>::storage;  // what shared memory holds
  using acc = accum_t<T>;                            // float, or double for double inputs
  static constexpr bool tensor_core = element_traits<T>::tensor_core;
  static constexpr int head_dim = HeadDim;  // padded head dim: 64, 96, 128 or 256
  static_assert(HeadDim % 16 == 0, "the mma k-step and the ldmatrix pairs need head dims in multiples of 16");
  static constexpr int vec = 16 / static_cast<int>(sizeof(elem));  // elements per 16-byte chunk
  // Row stride in shared memory: one 16-byte chunk of padding keeps every row 16-byte aligned (for
  // cp.async, ldmatrix and float4 reads) and shifts consecutive rows by 4 banks, so the 8 rows that
  // one ldmatrix or one float4 read touches fall into distinct banks.
  static constexpr int stride = HeadDim + vec;
  static constexpr tile_shape tiles = choose_tiles(sizeof(elem), stride, HeadDim);
  static_assert(tiles.warps > 0, "no tile shape fits in 99 KiB of shared memory");
  static constexpr int warps = tiles.warps;
  static constexpr int threads = 32 * warps;
  static constexpr int block_m = 16 * warps;
  static constexpr int block_n = tiles.block_n;
  static_assert(block_n % 16 == 0, "P V consumes keys 16 at a time");
  static constexpr std::size_t smem_bytes =
      static_cast<std::size_t>(block_m + 2 * block_n) * stride * sizeof(elem);
};

// ---- kernel arguments ---------------------------------------------------------------------------

// Everything a flash block needs, by value (kernel parameter space). Strides are in elements, in the
// logical axis order of the views: (batch, seq, head, dim) for q/k/v/out, (batch, head, seq) for
// lse, (batch, head, q, k) for bias with broadcast axes already turned into stride 0.
struct flash_args {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  index_t qs[4]{}, ks[4]{}, vs[4]{};
  void* out = nullptr;
  index_t os[4]{};
  index_t out_split_stride = 0;  // elements between the outputs of consecutive key splits
  void* lse = nullptr;           // null: not requested
  index_t ls[3]{};
  index_t lse_split_stride = 0;
  const float* bias = nullptr;
  index_t bs[4]{};
  const float* alibi = nullptr;         // device pointer, one slope per query head
  const index_t* kv_lengths = nullptr;  // device pointer, one length per batch
  index_t batch = 0, q_len = 0, kv_len = 0, q_heads = 0, kv_heads = 0, group = 1;
  index_t head_dim = 0, value_dim = 0;
  index_t rows = 0;        // q_len * group packed rows per (batch, kv head)
  index_t row_blocks = 0;  // ceil(rows / block_m)
  index_t split_keys = 0;  // keys per split, a multiple of block_n (>= kv_len when not splitting)
  double scale = 1.0;      // double so that the double path sees the same scale as the reference
  float softcap = 0.f;
  bool causal = false;
  index_t window_left = -1, window_right = -1;
  bool q_vec = false, k_vec = false, v_vec = false;  // 16-byte vector loads are legal for q/k/v
  // Block-sparse attention (block_sparse_plan.cuh, flash_forward_kernel<..., Sparse = true>). Block x visits
  // the key tiles (of block_n keys) of runs tile_runs[2r] <= tile < tile_runs[2r + 1] for r in
  // [tile_run_offsets[x], tile_run_offsets[x + 1]), and within them the keys j of row (b, h, i)
  // with mask[b * mask_bs + h * mask_hs + (i / mask_bq) * mask_kb + j / mask_bk] != 0.
  const index_t* tile_run_offsets = nullptr;
  const int* tile_runs = nullptr;
  const unsigned char* mask = nullptr;
  index_t mask_bs = 0, mask_hs = 0, mask_bq = 1, mask_bk = 1, mask_kb = 0;
};

// ---- small device helpers -------------------------------------------------------------------------

__device__ __forceinline__ index_t imin(index_t a, index_t b) { return a < b ? a : b; }
__device__ __forceinline__ index_t imax(index_t a, index_t b) { return a > b ? a : b; }
__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dev_tanh(double x) { return tanh(x); }
// NaN-ignoring max, like softmax_state::rescale: a NaN logit must not become the running max.
template <class A>
__device__ __forceinline__ A nan_ignoring_max(A x, A y) {
  return y > x ? y : x;
}

// Copies a tile of ROWS rows x head_dim-padded columns into shared memory. row_ptr(r) is the global
// address of element 0 of row r, or null for a row that must read as zeros (past the end of the
// sequence, outside the keys this block may use); columns >= dlen read as zeros too. With `vec` the
// caller guarantees 16-byte aligned rows, unit dim stride and dlen % Cfg::vec == 0, so every 16-byte
// chunk is either entirely data (copied with cp.async) or entirely padding. Otherwise elements are
// gathered one by one through the dim stride.
template <class Cfg, int ROWS, class RowPtr>
__device__ __forceinline__ void load_tile(typename Cfg::elem* smem, RowPtr row_ptr, index_t dlen,
                                          index_t dstride, bool vec) {
  using E = typename Cfg::elem;
  constexpr int P = Cfg::head_dim, STR = Cfg::stride, VEC = Cfg::vec, CHUNKS = P / VEC;
  if (vec) {
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += Cfg::threads) {
      const int r = c / CHUNKS, col = (c % CHUNKS) * VEC;
      E* dst = smem + r * STR + col;
      const E* src = row_ptr(r);
      if (src != nullptr && col < dlen)
        cp_async_16(dst, src + col);
      else
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * P; e += Cfg::threads) {
      const int r = e / P, d = e % P;
      const E* src = row_ptr(r);
      smem[r * STR + d] = (src != nullptr && d < dlen) ? src[d * dstride] : E(0);
    }
  }
}

// S (this warp's 16 rows x block_n keys) = Q K^T, in mma accumulator layout.
template <class Cfg>
__device__ __forceinline__ void tile_scores(typename Cfg::acc (&s)[Cfg::block_n / 8][4],
                                            const typename Cfg::elem* q_s, const typename Cfg::elem* k_s,
                                            int warp, int lane) {
  using E = typename Cfg::elem;
  using A = typename Cfg::acc;
  constexpr int P = Cfg::head_dim, STR = Cfg::stride, NT = Cfg::block_n / 8;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int c = 0; c < 4; ++c) s[n][c] = A(0);

  if constexpr (Cfg::tensor_core) {
    constexpr bool bf = element_traits<typename Cfg::element>::is_bf16;
    // A = Q rows 16w.., k-step kk: ldmatrix matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7),
    // (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) give reg0..reg3 of the A fragment; lane l
    // addresses row l % 16, column block l / 16.
    const E* q_row = q_s + (16 * warp + (lane & 15)) * STR + (lane >> 4) * 8;
    // B = K^T for key tiles n, n+1: matrices (keys 8n.., d lo), (keys 8n.., d hi), (keys 8n+8.., d lo),
    // (keys 8n+8.., d hi); K rows are B columns, so the plain (non-transposed) load gives
    // reg = K[8n + g][kk*16 + 2t..], i.e. B[2t..][g], as the B fragment wants.
    const E* k_row = k_s + ((lane >> 4) * 8 + (lane & 7)) * STR + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < P / 16; ++kk) {
      std::uint32_t a[4];
      ldmatrix_x4(a, q_row + kk * 16);
#pragma unroll
      for (int n = 0; n < NT; n += 2) {
        std::uint32_t b[4];
        ldmatrix_x4(b, k_row + n * 8 * STR + kk * 16);
        mma_16816<bf>(s[n], a, b[0], b[1]);
        mma_16816<bf>(s[n + 1], a, b[2], b[3]);
      }
    }
  } else {
    // FMA path, same ownership: rows g, g+8 and keys 8n+2t, 8n+2t+1. Reads 16-byte vectors along d.
    using V = std::conditional_t<std::is_same_v<A, float>, float4, double2>;
    constexpr int VEC = Cfg::vec;
    const int g = lane >> 2, t = lane & 3;
    const E* q0 = q_s + (16 * warp + g) * STR;
    const E* q1 = q0 + 8 * STR;
    const E* k0 = k_s + 2 * t * STR;
#pragma unroll 2
    for (int d = 0; d < P; d += VEC) {
      const V qa = *reinterpret_cast<const V*>(q0 + d);
      const V qb = *reinterpret_cast<const V*>(q1 + d);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const V ka = *reinterpret_cast<const V*>(k0 + n * 8 * STR + d);
        const V kb = *reinterpret_cast<const V*>(k0 + (n * 8 + 1) * STR + d);
        if constexpr (std::is_same_v<A, float>) {
          s[n][0] += qa.x * ka.x + qa.y * ka.y + qa.z * ka.z + qa.w * ka.w;
          s[n][1] += qa.x * kb.x + qa.y * kb.y + qa.z * kb.z + qa.w * kb.w;
          s[n][2] += qb.x * ka.x + qb.y * ka.y + qb.z * ka.z + qb.w * ka.w;
          s[n][3] += qb.x * kb.x + qb.y * kb.y + qb.z * kb.z + qb.w * kb.w;
        } else {
          s[n][0] += qa.x * ka.x + qa.y * ka.y;
          s[n][1] += qa.x * kb.x + qa.y * kb.y;
          s[n][2] += qb.x * ka.x + qb.y * ka.y;
          s[n][3] += qb.x * kb.x + qb.y * kb.y;
        }
      }
    }
  }
}

// O (this warp's 16 rows x head_dim) += P V, P in the S fragment layout (already exponentiated).
template <class Cfg>
__device__ __forceinline__ void tile_accumulate(typename Cfg::acc (&o)[Cfg::head_dim / 8][4],
                                                const typename Cfg::acc (&p)[Cfg::block_n / 8][4],
                                                const typename Cfg::elem* v_s, int lane) {
  using E = typename Cfg::elem;
  using A = typename Cfg::acc;
  constexpr int STR = Cfg::stride, NT = Cfg::block_n / 8, DT = Cfg::head_dim / 8;
  if constexpr (Cfg::tensor_core) {
    constexpr bool bf = element_traits<typename Cfg::element>::is_bf16;
    // The accumulators of key tiles 2kk and 2kk+1 are exactly the A fragment of the k-step kk of
    // P V (rows g/g+8, keys 2t.. and 2t+8..), so P goes to the tensor cores without shared memory.
    // B = V (keys x dims) is stored key-major, so it is read with ldmatrix .trans: matrices
    // (keys 16kk..+7, dims 8c..), (keys 16kk+8.., dims 8c..), (keys 16kk.., dims 8c+8..),
    // (keys 16kk+8.., dims 8c+8..) give the B fragments of dim tiles c and c+1.
    const E* v_row = v_s + (lane & 15) * STR + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      const std::uint32_t a[4] = {
          pack2<bf>(p[2 * kk][0], p[2 * kk][1]), pack2<bf>(p[2 * kk][2], p[2 * kk][3]),
          pack2<bf>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<bf>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
      for (int c = 0; c < DT; c += 2) {
        std::uint32_t b[4];
        ldmatrix_x4_trans(b, v_row + kk * 16 * STR + c * 8);
        mma_16816<bf>(o[c], a, b[0], b[1]);
        mma_16816<bf>(o[c + 1], a, b[2], b[3]);
      }
    }
  } else {
    // FMA path: row g needs P[g][key] for every key of the tile, spread over the 4 lanes of its
    // quad; fetch lane (4g + u)'s four values with shuffles (keys 8n + 2u, 8n + 2u + 1 of rows g and
    // g + 8) and apply them to this lane's columns 8c + 2t, 8c + 2t + 1.
    using V2 = std::conditional_t<std::is_same_v<A, float>, float2, double2>;
    const int t = lane & 3;
    const E* v_col = v_s + 2 * t;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int src = (lane & ~3) | u;
        const A p00 = __shfl_sync(0xffffffffu, p[n][0], src);  // row g,   key 8n + 2u
        const A p01 = __shfl_sync(0xffffffffu, p[n][1], src);  // row g,   key 8n + 2u + 1
        const A p10 = __shfl_sync(0xffffffffu, p[n][2], src);  // row g+8, key 8n + 2u
        const A p11 = __shfl_sync(0xffffffffu, p[n][3], src);  // row g+8, key 8n + 2u + 1
        const E* v0 = v_col + (8 * n + 2 * u) * STR;
        const E* v1 = v0 + STR;
#pragma unroll
        for (int c = 0; c < DT; ++c) {
          const V2 x0 = *reinterpret_cast<const V2*>(v0 + 8 * c);
          const V2 x1 = *reinterpret_cast<const V2*>(v1 + 8 * c);
          o[c][0] += p00 * x0.x + p01 * x1.x;
          o[c][1] += p00 * x0.y + p01 * x1.y;
          o[c][2] += p10 * x0.x + p11 * x1.x;
          o[c][3] += p10 * x0.y + p11 * x1.y;
        }
      }
    }
  }
}

// ---- the flash kernel -----------------------------------------------------------------------------

// Sparse: block-sparse attention (the tile_runs / mask fields of flash_args); a separate
// instantiation so that the dense kernel carries none of its state (registers, occupancy).
template <class Cfg, class TO, class TL, bool Sparse = false>
__global__ void __launch_bounds__(Cfg::threads) flash_forward_kernel(const flash_args a) {
  using E = typename Cfg::elem;
  using A = typename Cfg::acc;
  constexpr int BM = Cfg::block_m, BN = Cfg::block_n, STR = Cfg::stride;
  constexpr int NT = BN / 8, DT = Cfg::head_dim / 8;
  const A inf = A(INFINITY);

  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* const q_s = reinterpret_cast<E*>(smem_raw);
  E* const k_s = q_s + BM * STR;
  E* const v_s = k_s + BN * STR;

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane >> 2, t = lane & 3;

  // Block -> (batch, kv head, row block, split). Row blocks of one (batch, kv head) run last-first:
  // under causal masking the later rows see the most keys and should start earliest.
  const index_t rb = a.row_blocks - 1 - static_cast<index_t>(blockIdx.x) % a.row_blocks;
  const index_t bh = static_cast<index_t>(blockIdx.x) / a.row_blocks;
  const index_t b = bh / a.kv_heads, hk = bh % a.kv_heads;
  const index_t split = blockIdx.y;
  const index_t r_begin = rb * BM, r_end = imin(r_begin + BM, a.rows);  // r_begin < r_end

  // Existing keys of this batch (kv_lengths is a device pointer; values outside [0, kv_len] are
  // clamped so that no access leaves the k/v views) and the bottom-right diagonal offset.
  index_t len = a.kv_len;
  if (a.kv_lengths != nullptr) len = imax(index_t(0), imin(a.kv_lengths[b], a.kv_len));
  const index_t offset = len - a.q_len;
  const attention_mask mask{a.causal, a.window_left, a.window_right};

  // This lane's two rows: query index, query head and allowed keys [lo, hi). Rows past the end get
  // an empty range; they compute harmless values that are never stored.
  index_t row_i[2], row_h[2], row_lo[2], row_hi[2];
  bool row_ok[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const index_t r = r_begin + 16 * warp + g + 8 * e;
    row_ok[e] = r < r_end;
    row_i[e] = row_ok[e] ? r / a.group : 0;
    row_h[e] = hk * a.group + (row_ok[e] ? r % a.group : 0);
    row_lo[e] = row_hi[e] = 0;
    if (row_ok[e]) mask.key_range(row_i[e], len, offset, row_lo[e], row_hi[e]);
  }

  // Keys that any row of the block may see: ranges only move right as the query index grows, so
  // the first row bounds them from below and the last row from above. hi_first / lo_last bound the
  // tiles that need no element-wise mask. Clip to this split's chunk.
  index_t kv_lo, kv_hi, lo_last, hi_first;
  {
    index_t lo0, hi0, lo1, hi1;
    mask.key_range(r_begin / a.group, len, offset, lo0, hi0);
    mask.key_range((r_end - 1) / a.group, len, offset, lo1, hi1);
    // A row whose window lies wholly past the existing keys gets lo = hi > len (an empty range
    // there); clamping to len keeps every loaded key inside the k/v views.
    kv_lo = imax(lo0, split * a.split_keys);
    kv_hi = imin(imin(hi1, len), (split + 1) * a.split_keys);
    lo_last = lo1;
    hi_first = hi0;
  }

  // The key tiles to visit, in increasing order: seek(n) is the first tile start >= n (a multiple of
  // BN) that the block visits: n itself for dense attention, else inside one of the block's runs
  // (kv_hi when there is none left). Block-uniform: every thread walks the same runs.
  const int* runs = a.tile_runs;
  index_t run = 0, run_end = 0;
  if constexpr (Sparse) run = a.tile_run_offsets[blockIdx.x], run_end = a.tile_run_offsets[blockIdx.x + 1];
  auto seek = [&](index_t n) -> index_t {
    if constexpr (!Sparse) {
      return n;
    } else {
      while (run < run_end && static_cast<index_t>(runs[2 * run + 1]) * BN <= n) ++run;
      if (run == run_end) return kv_hi;
      const index_t start = static_cast<index_t>(runs[2 * run]) * BN;
      return start > n ? start : n;
    }
  };
  // Block-sparse: this lane's rows of the mask (indexed by key block).
  const unsigned char* row_mask[2] = {nullptr, nullptr};
  if constexpr (Sparse)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      row_mask[e] = a.mask + b * a.mask_bs + row_h[e] * a.mask_hs + (row_i[e] / a.mask_bq) * a.mask_kb;

  A o[DT][4];
#pragma unroll
  for (int c = 0; c < DT; ++c)
#pragma unroll
    for (int x = 0; x < 4; ++x) o[c][x] = A(0);
  kernels::softmax_state<A> state[2];

  const index_t n_first = kv_lo < kv_hi ? seek(kv_lo / BN * BN) : kv_hi;
  if (n_first < kv_hi) {  // block-uniform: every thread takes the same branch and loop trips
    const E* const q_g = static_cast<const E*>(a.q) + b * a.qs[0];
    const E* const k_g = static_cast<const E*>(a.k) + b * a.ks[0] + hk * a.ks[2];
    const E* const v_g = static_cast<const E*>(a.v) + b * a.vs[0] + hk * a.vs[2];
    auto q_row = [&](int r) -> const E* {
      const index_t R = r_begin + r;
      if (R >= r_end) return nullptr;
      return q_g + (R / a.group) * a.qs[1] + (hk * a.group + R % a.group) * a.qs[2];
    };
    // Keys outside [kv_lo, kv_hi) read as zeros: they may lie past kv_lengths[b], where a KV cache
    // can hold anything (0 * NaN would poison the row), and their logits are masked anyway.
    auto key_row = [&](const E* base, index_t seq_stride, index_t n0) {
      return [=](int r) -> const E* {
        const index_t j = n0 + r;
        return (j >= kv_lo && j < kv_hi) ? base + j * seq_stride : nullptr;
      };
    };

    load_tile<Cfg, BM>(q_s, q_row, a.head_dim, a.qs[3], a.q_vec);
    load_tile<Cfg, BN>(k_s, key_row(k_g, a.ks[1], n_first), a.head_dim, a.ks[3], a.k_vec);
    cp_async_commit();

    for (index_t n0 = n_first, n_next; n0 < kv_hi; n0 = n_next) {
      // K(n0) (and Q) have landed; every warp has finished reading V of the previous tile.
      cp_async_wait_all();
      __syncthreads();
      load_tile<Cfg, BN>(v_s, key_row(v_g, a.vs[1], n0), a.value_dim, a.vs[3], a.v_vec);
      cp_async_commit();  // V(n0) streams in while S is computed

      A s[NT][4];
      tile_scores<Cfg>(s, q_s, k_s, warp, lane);

      // Logits as DESIGN.md defines them, then the mask. Tiles inside every row's range skip the
      // per-element range test.
      const bool full_tile = !Sparse && lo_last <= n0 && n0 + BN <= hi_first;
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int e = x >> 1;
          const index_t j = n0 + 8 * n + 2 * t + (x & 1);
          if (!full_tile &&
              (!(j >= row_lo[e] && j < row_hi[e]) || (Sparse && row_mask[e][j / a.mask_bk] == 0))) {
            s[n][x] = -inf;
            continue;
          }
          A z = s[n][x] * A(a.scale);
          if (a.softcap > 0.f) z = A(a.softcap) * dev_tanh(z / A(a.softcap));
          if (a.bias != nullptr)
            z += A(a.bias[b * a.bs[0] + row_h[e] * a.bs[1] + row_i[e] * a.bs[2] + j * a.bs[3]]);
          if (a.alibi != nullptr) {
            const index_t dist = row_i[e] + offset - j;
            z -= A(a.alibi[row_h[e]]) * A(dist < 0 ? -dist : dist);
          }
          s[n][x] = z;
        }

        // Online softmax per row: the block max is reduced over the 4 lanes of the quad (which hold
        // the row's other keys), so all of them rescale identically and keep partial sums of l.
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        A mx = -inf;
#pragma unroll
        for (int n = 0; n < NT; ++n)
          mx = nan_ignoring_max(mx, nan_ignoring_max(s[n][2 * e], s[n][2 * e + 1]));
        mx = nan_ignoring_max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = nan_ignoring_max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const A alpha = state[e].rescale(mx);
#pragma unroll
        for (int c = 0; c < DT; ++c) {
          o[c][2 * e] *= alpha;
          o[c][2 * e + 1] *= alpha;
        }
        const A off = state[e].offset();
        A sum = 0;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int x = 2 * e; x < 2 * e + 2; ++x) {
            s[n][x] = dev_exp(s[n][x] - off);
            sum += s[n][x];
          }
        state[e].add(sum);
      }

      // V(n0) has landed; every warp has finished reading K(n0), so the next K may overwrite it
      // while P V runs.
      cp_async_wait_all();
      __syncthreads();
      n_next = seek(n0 + BN);
      if (n_next < kv_hi) {
        load_tile<Cfg, BN>(k_s, key_row(k_g, a.ks[1], n_next), a.head_dim, a.ks[3], a.k_vec);
        cp_async_commit();
      }
      tile_accumulate<Cfg>(o, s, v_s, lane);
    }
  }

  // Epilogue: complete l over the quad, normalise, store. out and lse point at the final tensors,
  // or at this split's slice of the workspace.
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    state[e].l += __shfl_xor_sync(0xffffffffu, state[e].l, 1);
    state[e].l += __shfl_xor_sync(0xffffffffu, state[e].l, 2);
    if (!row_ok[e]) continue;
    const bool empty = state[e].l == A(0);  // no allowed key: output exactly 0 (DESIGN.md)
    const A scale = state[e].output_scale();
    TO* const out = static_cast<TO*>(a.out) + split * a.out_split_stride + b * a.os[0] + row_i[e] * a.os[1] +
                    row_h[e] * a.os[2];
#pragma unroll
    for (int c = 0; c < DT; ++c)
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        const index_t d = 8 * c + 2 * t + x;
        if (d < a.value_dim) out[d * a.os[3]] = static_cast<TO>(empty ? A(0) : o[c][2 * e + x] * scale);
      }
    if (a.lse != nullptr && t == 0) {
      TL* const lse = static_cast<TL*>(a.lse) + split * a.lse_split_stride;
      lse[b * a.ls[0] + row_h[e] * a.ls[1] + row_i[e] * a.ls[2]] = static_cast<TL>(state[e].lse());
    }
  }
}

// ---- merging partial results ----------------------------------------------------------------------

inline constexpr int merge_warps = 4;   // rows per merge block, one warp per row
inline constexpr int max_splits = 128;  // upper bound of the split-KV plan (see flash_plan.cuh)
template <class A>
inline constexpr std::size_t merge_splits_smem = std::size_t(merge_warps) * max_splits * sizeof(A);

// Combines the `splits` partial results of every row (workspace layout [split][b][h][i][d] for o and
// [split][b][h][i] for lse) into out/lse. The partial log-sum-exps are treated like logits and the
// partial outputs like values of one more softmax: m = max lse_s, w_s = exp(lse_s - m),
// o = sum_s w_s o_s / sum_s w_s, lse = m + log(sum_s w_s), via the same softmax_state as the
// kernel, so empty splits (lse -inf) weigh 0 and NaN propagates. Sums run over s = 0, 1, ... in
// that order in every lane: the result does not depend on scheduling.
template <class A, class TO, class TL>
__global__ void __launch_bounds__(32 * merge_warps)
    merge_splits_kernel(const A* __restrict__ ws_o, const A* __restrict__ ws_lse, int splits, index_t batch,
                        index_t heads, index_t q_len, index_t value_dim, TO* out, index_t os0, index_t os1,
                        index_t os2, index_t os3, TL* lse, index_t ls0, index_t ls1, index_t ls2) {
  // Dynamic shared memory (merge_splits_smem bytes): one weight per split for each warp's row.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* const weights = reinterpret_cast<A*>(smem_raw) + (threadIdx.x / 32) * max_splits;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const index_t rows = batch * heads * q_len;
  const index_t row = static_cast<index_t>(blockIdx.x) * merge_warps + warp;
  if (row >= rows) return;  // whole warps leave together; no block-wide barrier follows
  const index_t i = row % q_len, h = (row / q_len) % heads, b = row / (q_len * heads);

  kernels::softmax_state<A> st;
  A mx = -A(INFINITY);
  for (int s = lane; s < splits; s += 32) mx = nan_ignoring_max(mx, ws_lse[s * rows + row]);
#pragma unroll
  for (int w = 16; w > 0; w /= 2) mx = nan_ignoring_max(mx, __shfl_xor_sync(0xffffffffu, mx, w));
  st.rescale(mx);
  const A off = st.offset();
  for (int s = lane; s < splits; s += 32) weights[s] = dev_exp(ws_lse[s * rows + row] - off);
  __syncwarp();
  A sum = 0;
  for (int s = 0; s < splits; ++s) sum += weights[s];
  st.add(sum);
  const bool empty = st.l == A(0);
  const A scale = st.output_scale();
  for (index_t d = lane; d < value_dim; d += 32) {
    A acc = 0;
    for (int s = 0; s < splits; ++s) {
      const A w = weights[s];
      if (w != A(0)) acc += w * ws_o[(s * rows + row) * value_dim + d];
    }
    out[b * os0 + i * os1 + h * os2 + d * os3] = static_cast<TO>(empty ? A(0) : acc * scale);
  }
  if (lse != nullptr && lane == 0) lse[b * ls0 + h * ls1 + i * ls2] = static_cast<TL>(st.lse());
}

// Strided views of one merge operand, as kernel arguments.
template <class T>
struct rows_view {
  T* o = nullptr;
  index_t os[4]{};  // (batch, seq, head, dim)
};

// o, lse = merge of (o_a, lse_a) and (o_b, lse_b) with the weights of kernels::merge_lse (the CPU
// operator's formula); a side of weight 0 contributes nothing even if its o holds NaN or garbage
// (an empty partial result may). One warp per row: every lane reads both lse values before lane 0 writes the
// merged one, so lse may alias lse_a or lse_b, and each output element is read and written by the same lane,
// so o may alias o_a or o_b (identical views; partial overlaps are not supported).
template <class A, class TI, class TLI, class TO, class TL>
__global__ void __launch_bounds__(32 * merge_warps)
    merge_pair_kernel(rows_view<const TI> oa, const TLI* lse_a, index_t la0, index_t la1, index_t la2,
                      rows_view<const TI> ob, const TLI* lse_b, index_t lb0, index_t lb1, index_t lb2,
                      rows_view<TO> o, TL* lse, index_t l0, index_t l1, index_t l2, index_t batch,
                      index_t heads, index_t q_len, index_t dim) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const index_t row = static_cast<index_t>(blockIdx.x) * merge_warps + warp;
  if (row >= batch * heads * q_len) return;
  const index_t i = row % q_len, h = (row / q_len) % heads, b = row / (q_len * heads);
  const kernels::merge_weights<A> w = kernels::merge_lse(static_cast<A>(lse_a[b * la0 + h * la1 + i * la2]),
                                                         static_cast<A>(lse_b[b * lb0 + h * lb1 + i * lb2]));
  const TI* pa = oa.o + b * oa.os[0] + i * oa.os[1] + h * oa.os[2];
  const TI* pb = ob.o + b * ob.os[0] + i * ob.os[1] + h * ob.os[2];
  TO* po = o.o + b * o.os[0] + i * o.os[1] + h * o.os[2];
  for (index_t d = lane; d < dim; d += 32) {
    const A x = w.w_a == A(0) ? A(0) : w.w_a * static_cast<A>(pa[d * oa.os[3]]);
    const A y = w.w_b == A(0) ? A(0) : w.w_b * static_cast<A>(pb[d * ob.os[3]]);
    po[d * o.os[3]] = static_cast<TO>(x + y);
  }
  __syncwarp();
  if (lse != nullptr && lane == 0) lse[b * l0 + h * l1 + i * l2] = static_cast<TL>(w.lse);
}

}  // namespace attnkit::cuda::detail
