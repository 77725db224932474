// Host-side preparation of cuda::block_sparse_attention, free of CUDA runtime calls: the flash
// kernel (flash_kernel.cuh, its Sparse instantiation) runs as for dense attention except that each
// thread block visits only the key tiles that hold an active mask block for one of its rows, and
// tests the mask elementwise inside them.
// Here: the CPU operator's checks, the per-block lists of key-tile runs and the dense byte mask,
// uploaded into one workspace through the Launcher (see linear_plan.cuh for its upload()).
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstring>
#include <string_view>
#include <vector>

#include "attnkit/cuda/core.cuh"
#include "attnkit/cuda/cpu_ops.cuh"
#include "attnkit/cuda/flash_plan.cuh"

namespace attnkit::cuda::detail {

// The mask as bytes [mask batch][mask heads][q_blocks][k_blocks] (1 = active) and the strides the
// kernel reads it with (batch / heads strides 0 when the mask broadcasts that axis).
struct dense_block_mask {
  std::vector<unsigned char> bytes;
  index_t bs = 0, hs = 0;
};

inline dense_block_mask densify(const block_mask& m) {
  dense_block_mask d;
  const index_t nqb = m.q_blocks(), nkb = m.k_blocks();
  d.bytes.assign(static_cast<std::size_t>(std::max<index_t>(m.batch() * m.heads() * nqb * nkb, 1)), 0);
  d.hs = m.heads() > 1 ? nqb * nkb : 0;
  d.bs = m.batch() > 1 ? m.heads() * nqb * nkb : 0;
  for (index_t b = 0; b < m.batch(); ++b)
    for (index_t h = 0; h < m.heads(); ++h)
      for (index_t qb = 0; qb < nqb; ++qb) {
        unsigned char* row = d.bytes.data() + ((b * m.heads() + h) * nqb + qb) * nkb;
        for (const block_range& r : m.active(b, h, qb)) std::fill(row + r.begin, row + r.end, 1);
      }
  return d;
}

// For every thread block of the flash grid (block x = (batch, kv head) * row_blocks + reversed row
// block, as flash_forward_kernel numbers them), the runs of key tiles of block_n keys that contain
// an active mask block of one of its rows: offsets (blocks + 1) and runs as [begin, end) pairs.
struct tile_runs {
  std::vector<index_t> offsets;
  std::vector<int> runs;
};

inline tile_runs plan_tile_runs(const flash_args& a, const block_mask& m, index_t block_m, index_t block_n) {
  tile_runs t;
  const index_t tiles = (a.kv_len + block_n - 1) / block_n, mbq = m.block_q(), mbk = m.block_k();
  const index_t blocks = a.row_blocks * a.batch * a.kv_heads;
  t.offsets.reserve(static_cast<std::size_t>(blocks + 1));
  t.offsets.push_back(0);
  std::vector<unsigned char> hit(static_cast<std::size_t>(tiles));
  for (index_t x = 0; x < blocks; ++x) {
    const index_t rb = a.row_blocks - 1 - x % a.row_blocks, bh = x / a.row_blocks;
    const index_t b = bh / a.kv_heads, hk = bh % a.kv_heads;
    const index_t r_begin = rb * block_m, r_end = std::min(r_begin + block_m, a.rows);
    // The block's rows cover queries i_first..i_last of the group's heads (all heads for every
    // query: a superset when the block starts or ends inside a query, which only adds tiles).
    const index_t qb_first = (r_begin / a.group) / mbq, qb_last = ((r_end - 1) / a.group) / mbq;
    std::fill(hit.begin(), hit.end(), 0);
    for (index_t h = hk * a.group; h < (hk + 1) * a.group; ++h)
      for (index_t qb = qb_first; qb <= qb_last; ++qb)
        for (const block_range& r : m.active(b, h, qb)) {
          const index_t k0 = r.begin * mbk, k1 = std::min(r.end * mbk, a.kv_len);
          for (index_t tile = k0 / block_n; tile * block_n < k1; ++tile) hit[static_cast<std::size_t>(tile)] = 1;
        }
    for (index_t tile = 0; tile < tiles; ++tile) {
      if (!hit[static_cast<std::size_t>(tile)]) continue;
      if (!t.runs.empty() && t.offsets.back() < index_t(t.runs.size() / 2) && t.runs.back() == tile)
        ++t.runs.back();
      else
        t.runs.insert(t.runs.end(), {static_cast<int>(tile), static_cast<int>(tile + 1)});
    }
    t.offsets.push_back(index_t(t.runs.size() / 2));
  }
  return t;
}

// Validates a block-sparse call with the CPU operator's checks and messages (plus the CUDA head-dim
// limit) and returns the flash kernel's arguments (without the mask fields, set by run_block_sparse).
template <class TQ, class TK, class TV, class TO, class TL>
flash_args prepare_block_sparse(std::string_view fn, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                                const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out, const block_mask& mask,
                                const attention_params& p, const tensor_view<TL, 3>& lse) {
  check_flash_types<TQ, TK, TV, TO, TL>();
  attention_params host_params = p;  // alibi_slopes and kv_lengths are device arrays, not read here
  host_params.alibi_slopes = nullptr;
  host_params.kv_lengths = nullptr;
  const attention_shape s = attnkit::detail::validate_attention(fn, q, k, v, out, host_params, lse);
  attnkit::detail::validate_block_mask(fn, mask, s);
  const index_t widest = s.head_dim > s.value_dim ? s.head_dim : s.value_dim;
  attnkit::detail::require(widest <= max_head_dim, fn, "q/k/v", head_dim_limit(), widest);
  attnkit::detail::require(ceil_div(s.kv_len, 16) <= INT_MAX, fn, "k", "at most 2^31 - 1 key tiles", s.kv_len);
  return make_flash_args(s, q, k, v, out, p, lse);
}

// The launch of a prepared block-sparse call for one compiled tile configuration: never split.
template <class Cfg, class TO, class TL, class Launcher>
void run_block_sparse(std::string_view fn, flash_args a, const block_mask& mask, Launcher& launch) {
  const flash_plan pl = plan<Cfg>(a, false);
  attnkit::detail::require(pl.base_blocks <= INT_MAX, fn, "q",
                           "at most 2^31 - 1 thread blocks (batch x kv heads x row blocks)", pl.base_blocks);
  const tile_runs tr = plan_tile_runs(a, mask, Cfg::block_m, Cfg::block_n);
  const dense_block_mask dm = densify(mask);
  const std::size_t off_bytes = tr.offsets.size() * sizeof(index_t), run_bytes = tr.runs.size() * sizeof(int);
  auto ws = launch.workspace(off_bytes + run_bytes + dm.bytes.size() + 16);
  unsigned char* base = static_cast<unsigned char*>(ws.ptr);
  launch.upload(base, tr.offsets.data(), off_bytes);
  launch.upload(base + off_bytes, tr.runs.data(), run_bytes);
  launch.upload(base + off_bytes + run_bytes, dm.bytes.data(), dm.bytes.size());
  a.tile_run_offsets = reinterpret_cast<const index_t*>(base);
  a.tile_runs = reinterpret_cast<const int*>(base + off_bytes);
  a.mask = base + off_bytes + run_bytes;
  a.mask_bs = dm.bs, a.mask_hs = dm.hs, a.mask_bq = mask.block_q(), a.mask_bk = mask.block_k();
  a.mask_kb = mask.k_blocks();
  launch.kernel("flash_forward_kernel (block-sparse)", &flash_forward_kernel<Cfg, TO, TL, true>,
                dim3(static_cast<unsigned>(pl.base_blocks)), Cfg::threads, Cfg::smem_bytes, a);
}

template <class T, class TO, class TL, class Launcher>
void dispatch_block_sparse(std::string_view fn, const flash_args& a, const block_mask& mask, Launcher& launch) {
  const index_t widest = a.head_dim > a.value_dim ? a.head_dim : a.value_dim;
  dispatch_head_dim(fn, widest, [&](auto head_dim) {
    run_block_sparse<flash_config<T, decltype(head_dim)::value>, TO, TL>(fn, a, mask, launch);
  });
}

}  // namespace attnkit::cuda::detail
