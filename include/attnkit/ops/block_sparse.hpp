// block_sparse_attention: exact softmax attention restricted to the (query block, key block) tiles
// that a block_mask marks active, computed with flash attention's tile machinery.
//
// Semantics: query row i of (batch b, head h) lies in query block qb = i / block_q; it attends to
// exactly the keys of the key blocks kb (keys [kb * block_k, (kb + 1) * block_k)) active for
// (b, h, qb), intersected with the keys attention_params allows (causal, window, kv_lengths),
// with bias / ALiBi / softcap as in reference_attention. This equals reference_attention with an
// extra additive bias that is 0 on active tiles and -inf elsewhere. A row with no allowed key gets
// output 0 and log-sum-exp -inf. The last query / key block may be partial.
//
// Work items are (batch, head, query block, row group): a mask query block is split into equal
// groups of at most detail::block_sparse_max_rows rows (one kernels::softmax_block each). For each
// group, the active key blocks (stored as runs of consecutive blocks) are clipped to the keys any
// row of the group may see and streamed in tiles of flash_tiles::block_k keys starting at each
// run's first key, K and V read in place when their element type is the accumulation type. Elementwise masks are applied
// only inside tiles that straddle a row's causal/window boundary. A full mask therefore performs
// flash_attention's prefill computation tile for tile (see flash.hpp): each query row meets the
// same key tiles in the same order, and a row's arithmetic does not depend on which rows share its
// softmax_block, so the results are bitwise equal to flash_attention's prefill whenever the row
// groups start at the same first allowed key (always unless params.window_left is set).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "attnkit/core/attention_params.hpp"
#include "attnkit/core/parallel.hpp"
#include "attnkit/kernels/flash_tile.hpp"
#include "attnkit/ops/flash.hpp"

namespace attnkit {

// A half-open run [begin, end) of consecutive active key blocks.
struct block_range {
  index_t begin = 0, end = 0;
  friend bool operator==(const block_range&, const block_range&) = default;
};

namespace detail {

// Appends key block kb (given in increasing order) to a run list, extending the last run when kb
// follows it.
inline void append_block(std::vector<block_range>& runs, index_t kb) {
  if (!runs.empty() && runs.back().end == kb) ++runs.back().end;
  else runs.push_back({kb, kb + 1});
}

}  // namespace detail

// Which (query block, key block) tiles are computed, per (batch, head). Logical extents
// (batch, heads, q_blocks, k_blocks); q_blocks = ceil(Nq / block_q), k_blocks = ceil(Nk / block_k).
// Storage: for each stored (batch, head, query block) row, the active key blocks as sorted,
// disjoint, non-adjacent runs (compressed rows of runs), so a band, a causal prefix or a full row
// costs one run. An axis of batch or heads that is broadcast (extent 1, or stride 0 in the grid
// given to from_dense / top_k) is stored once. block_sparse_attention accepts a mask whose batch
// or heads extent is 1 for any batch / head count (broadcast).
class block_mask {
 public:
  block_mask() = default;

  // grid(b, h, qb, kb) != 0 marks tile (qb, kb) of (b, h) active. Stride 0 on the batch or head
  // axis stores that axis once.
  static block_mask from_dense(index_t block_q, index_t block_k, tensor_view<const std::uint8_t, 4> grid) {
    check_blocks("block_mask::from_dense", block_q, block_k);
    const bool bs = grid.extent(0) <= 1 || grid.stride(0) == 0, hs = grid.extent(1) <= 1 || grid.stride(1) == 0;
    return build(block_q, block_k, grid.extent(0), grid.extent(1), grid.extent(2), grid.extent(3), bs, hs,
                 [&](index_t b, index_t h, index_t qb, std::vector<block_range>& runs) {
                   for (index_t kb = 0; kb < grid.extent(3); ++kb)
                     if (grid(b, h, qb, kb) != 0) detail::append_block(runs, kb);
                 });
  }

  // Every tile active.
  static block_mask full(index_t block_q, index_t block_k, index_t q_len, index_t kv_len, index_t batch = 1,
                         index_t heads = 1) {
    return geometric("block_mask::full", block_q, block_k, q_len, kv_len, batch, heads,
                     [](index_t, index_t, index_t nkb) { return block_range{0, nkb}; });
  }

  // The tiles holding at least one (query, key) pair allowed by bottom-right aligned causal
  // masking (key j <= query i + kv_len - q_len). Combine with attention_params::causal for the
  // elementwise part inside the diagonal tiles.
  static block_mask causal(index_t block_q, index_t block_k, index_t q_len, index_t kv_len, index_t batch = 1,
                           index_t heads = 1) {
    const index_t off = kv_len - q_len;
    return geometric("block_mask::causal", block_q, block_k, q_len, kv_len, batch, heads,
                     [=](index_t, index_t last, index_t nkb) {
                       return block_range{0, std::clamp<index_t>(detail::floor_div(last + off, block_k) + 1, 0, nkb)};
                     });
  }

  // A band of key blocks around the diagonal (bottom-right aligned): for a query block whose rows
  // i_first..i_last have diagonal keys d = i + kv_len - q_len, the key blocks from
  // floor(d_first / block_k) - blocks_left to floor(d_last / block_k) + blocks_right.
  static block_mask local(index_t block_q, index_t block_k, index_t q_len, index_t kv_len, index_t blocks_left,
                          index_t blocks_right, index_t batch = 1, index_t heads = 1) {
    constexpr const char* fn = "block_mask::local";
    detail::require(blocks_left >= 0, fn, "blocks_left", "a value >= 0", blocks_left);
    detail::require(blocks_right >= 0, fn, "blocks_right", "a value >= 0", blocks_right);
    const index_t off = kv_len - q_len;
    return geometric(fn, block_q, block_k, q_len, kv_len, batch, heads, [=](index_t first, index_t last, index_t nkb) {
      const index_t lo = detail::floor_div(first + off, block_k) - blocks_left;
      const index_t hi = detail::floor_div(last + off, block_k) + blocks_right + 1;
      const index_t b = std::clamp<index_t>(lo, 0, nkb), e = std::clamp<index_t>(hi, 0, nkb);
      return block_range{b, std::max(b, e)};
    });
  }

  // The first `first_blocks` key blocks for every query block (global / attention-sink keys).
  static block_mask global(index_t block_q, index_t block_k, index_t q_len, index_t kv_len, index_t first_blocks,
                           index_t batch = 1, index_t heads = 1) {
    constexpr const char* fn = "block_mask::global";
    detail::require(first_blocks >= 0, fn, "first_blocks", "a value >= 0", first_blocks);
    return geometric(fn, block_q, block_k, q_len, kv_len, batch, heads,
                     [=](index_t, index_t, index_t nkb) { return block_range{0, std::min(first_blocks, nkb)}; });
  }

  // Per (b, h, qb), the k key blocks with the highest scores(b, h, qb, kb) (ties to the lower
  // index); entries that are -inf or NaN are never selected, so a row may get fewer than k.
  // Stride 0 on the batch or head axis stores that axis once.
  static block_mask top_k(index_t block_q, index_t block_k, tensor_view<const float, 4> scores, index_t k) {
    constexpr const char* fn = "block_mask::top_k";
    check_blocks(fn, block_q, block_k);
    detail::require(k >= 0, fn, "k", "a value >= 0", k);
    const bool bs = scores.extent(0) <= 1 || scores.stride(0) == 0,
               hs = scores.extent(1) <= 1 || scores.stride(1) == 0;
    const index_t nkb = scores.extent(3);
    std::vector<index_t> order;
    return build(block_q, block_k, scores.extent(0), scores.extent(1), scores.extent(2), nkb, bs, hs,
                 [&](index_t b, index_t h, index_t qb, std::vector<block_range>& runs) {
                   order.clear();
                   for (index_t kb = 0; kb < nkb; ++kb) {
                     const float x = scores(b, h, qb, kb);
                     if (!std::isnan(x) && x != -std::numeric_limits<float>::infinity()) order.push_back(kb);
                   }
                   const auto take = std::min<std::size_t>(order.size(), std::size_t(k));
                   std::partial_sort(order.begin(), order.begin() + std::ptrdiff_t(take), order.end(),
                                     [&](index_t a, index_t c) {
                                       const float xa = scores(b, h, qb, a), xc = scores(b, h, qb, c);
                                       return xa > xc || (xa == xc && a < c);
                                     });
                   order.resize(take);
                   std::sort(order.begin(), order.end());
                   for (index_t kb : order) detail::append_block(runs, kb);
                 });
  }

  // Tilewise union / intersection. Block sizes and block counts must agree; a batch or heads
  // extent of 1 broadcasts against the other mask's.
  static block_mask unite(const block_mask& a, const block_mask& b) {
    return combine("block_mask::unite", a, b, true);
  }
  static block_mask intersect(const block_mask& a, const block_mask& b) {
    return combine("block_mask::intersect", a, b, false);
  }

  bool is_active(index_t b, index_t h, index_t qb, index_t kb) const {
    const auto r = active(b, h, qb);
    const auto it = std::upper_bound(r.begin(), r.end(), kb, [](index_t x, const block_range& run) { return x < run.begin; });
    return it != r.begin() && kb < std::prev(it)->end;
  }

  // The active key blocks of (b, h, qb) as sorted, disjoint, non-adjacent runs. A batch or heads
  // extent of 1 accepts any b / h (broadcast).
  std::span<const block_range> active(index_t b, index_t h, index_t qb) const {
    constexpr const char* fn = "block_mask::active";
    detail::require(batch_ == 1 || (b >= 0 && b < batch_), fn, "b", detail::text("in [0, ", batch_, ")"), b);
    detail::require(heads_ == 1 || (h >= 0 && h < heads_), fn, "h", detail::text("in [0, ", heads_, ")"), h);
    detail::require(qb >= 0 && qb < nqb_, fn, "qb", detail::text("in [0, ", nqb_, ")"), qb);
    return runs_of(row_of(b, h, qb));
  }

  index_t block_q() const { return bq_; }
  index_t block_k() const { return bk_; }
  index_t batch() const { return batch_; }
  index_t heads() const { return heads_; }
  index_t q_blocks() const { return nqb_; }
  index_t k_blocks() const { return nkb_; }
  // Active tiles over all logical (batch, head, q_block, k_block).
  index_t active_tiles() const { return active_; }
  // Active tiles / all tiles (0 for an empty mask).
  double density() const {
    const double all = double(batch_) * double(heads_) * double(nqb_) * double(nkb_);
    return all > 0 ? double(active_) / all : 0.0;
  }
  // (batch, head, query block) rows actually stored: broadcast axes count once.
  index_t stored_rows() const { return index_t(row_start_.size()) - 1; }

  // Builds a mask row by row: row(b, h, qb, runs) appends the active key blocks of (b, h, qb) to
  // `runs` (sorted; adjacent runs are merged here). Rows are visited only for stored (b, h):
  // b = 0 when batch_shared, h = 0 when heads_shared.
  template <class RowFn>
  static block_mask build(index_t block_q, index_t block_k, index_t batch, index_t heads, index_t q_blocks,
                          index_t k_blocks, bool batch_shared, bool heads_shared, RowFn&& row) {
    block_mask m;
    m.bq_ = block_q;
    m.bk_ = block_k;
    m.batch_ = batch;
    m.heads_ = heads;
    m.nqb_ = q_blocks;
    m.nkb_ = k_blocks;
    m.batch_shared_ = batch_shared || batch <= 1;
    m.heads_shared_ = heads_shared || heads <= 1;
    const index_t sb = m.batch_shared_ ? std::min<index_t>(batch, 1) : batch;
    const index_t sh = m.heads_shared_ ? std::min<index_t>(heads, 1) : heads;
    m.row_start_.assign(1, 0);
    std::vector<block_range> runs;
    index_t stored_active = 0;
    for (index_t b = 0; b < sb; ++b)
      for (index_t h = 0; h < sh; ++h)
        for (index_t qb = 0; qb < q_blocks; ++qb) {
          runs.clear();
          row(b, h, qb, runs);
          for (const auto& r : runs) {
            detail::require(0 <= r.begin && r.begin < r.end && r.end <= k_blocks, "block_mask::build", "runs",
                            detail::text("non-empty runs inside [0, ", k_blocks, ")"),
                            detail::concat("[", r.begin, ", ", r.end, ")"));
            if (!m.runs_.empty() && index_t(m.runs_.size()) > m.row_start_.back()) {
              auto& last = m.runs_.back();
              detail::require(r.begin >= last.end, "block_mask::build", "runs", "sorted, disjoint runs",
                              detail::text("[", r.begin, ", ", r.end, ") after [", last.begin, ", ", last.end, ")"));
              if (r.begin == last.end) {
                last.end = r.end;
                stored_active += r.end - r.begin;
                continue;
              }
            }
            m.runs_.push_back(r);
            stored_active += r.end - r.begin;
          }
          m.row_start_.push_back(index_t(m.runs_.size()));
        }
    m.active_ = stored_active * (m.batch_shared_ ? batch : 1) * (m.heads_shared_ ? heads : 1);
    return m;
  }

 private:
  index_t bq_ = 1, bk_ = 1, batch_ = 0, heads_ = 0, nqb_ = 0, nkb_ = 0, active_ = 0;
  bool batch_shared_ = true, heads_shared_ = true;
  std::vector<index_t> row_start_{0};
  std::vector<block_range> runs_;

  index_t row_of(index_t b, index_t h, index_t qb) const {
    const index_t sh = heads_shared_ ? 1 : heads_;
    return ((batch_shared_ ? 0 : b) * sh + (heads_shared_ ? 0 : h)) * nqb_ + qb;
  }
  std::span<const block_range> runs_of(index_t row) const {
    return {runs_.data() + row_start_[std::size_t(row)],
            std::size_t(row_start_[std::size_t(row) + 1] - row_start_[std::size_t(row)])};
  }

  static void check_blocks(const char* fn, index_t block_q, index_t block_k) {
    detail::require(block_q >= 1, fn, "block_q", "a value >= 1", block_q);
    detail::require(block_k >= 1, fn, "block_k", "a value >= 1", block_k);
  }

  // A mask shared over batch and heads whose row qb is the single run range(first row, last row, k_blocks).
  template <class RangeFn>
  static block_mask geometric(const char* fn, index_t block_q, index_t block_k, index_t q_len, index_t kv_len,
                              index_t batch, index_t heads, RangeFn&& range) {
    check_blocks(fn, block_q, block_k);
    detail::require(q_len >= 0, fn, "q_len", "a value >= 0", q_len);
    detail::require(kv_len >= 0, fn, "kv_len", "a value >= 0", kv_len);
    detail::require(batch >= 1, fn, "batch", "a value >= 1", batch);
    detail::require(heads >= 1, fn, "heads", "a value >= 1", heads);
    const index_t nqb = detail::ceil_div(q_len, block_q), nkb = detail::ceil_div(kv_len, block_k);
    return build(block_q, block_k, batch, heads, nqb, nkb, true, true,
                 [&](index_t, index_t, index_t qb, std::vector<block_range>& runs) {
                   const index_t first = qb * block_q, last = std::min(q_len, first + block_q) - 1;
                   const block_range r = range(first, last, nkb);
                   if (r.begin < r.end) runs.push_back(r);
                 });
  }

  static block_mask combine(const char* fn, const block_mask& a, const block_mask& b, bool is_union) {
    const bool ok = a.bq_ == b.bq_ && a.bk_ == b.bk_ && a.nqb_ == b.nqb_ && a.nkb_ == b.nkb_ &&
                    (a.batch_ == b.batch_ || a.batch_ == 1 || b.batch_ == 1) &&
                    (a.heads_ == b.heads_ || a.heads_ == 1 || b.heads_ == 1);
    if (!ok)
      detail::fail(fn, "b", detail::concat("a mask with blocks ", a.bq_, " x ", a.bk_, " and extents (", a.batch_, ", ",
                                           a.heads_, ", ", a.nqb_, ", ", a.nkb_, ") (batch/heads 1 broadcast)"),
                   detail::concat("blocks ", b.bq_, " x ", b.bk_, " and extents (", b.batch_, ", ", b.heads_, ", ",
                                  b.nqb_, ", ", b.nkb_, ")"));
    const index_t batch = std::max(a.batch_, b.batch_), heads = std::max(a.heads_, b.heads_);
    const bool bs = (a.batch_shared_ || a.batch_ == 1) && (b.batch_shared_ || b.batch_ == 1);
    const bool hs = (a.heads_shared_ || a.heads_ == 1) && (b.heads_shared_ || b.heads_ == 1);
    return build(a.bq_, a.bk_, batch, heads, a.nqb_, a.nkb_, bs, hs,
                 [&](index_t bb, index_t h, index_t qb, std::vector<block_range>& runs) {
                   const auto ra = a.runs_of(a.row_of(a.batch_ == 1 ? 0 : bb, a.heads_ == 1 ? 0 : h, qb));
                   const auto rb = b.runs_of(b.row_of(b.batch_ == 1 ? 0 : bb, b.heads_ == 1 ? 0 : h, qb));
                   // Sweep over the run boundaries of both lists.
                   std::size_t i = 0, j = 0;
                   if (is_union) {
                     while (i < ra.size() || j < rb.size()) {
                       const bool take_a = j == rb.size() || (i < ra.size() && ra[i].begin <= rb[j].begin);
                       const block_range r = take_a ? ra[i++] : rb[j++];
                       if (!runs.empty() && r.begin <= runs.back().end) runs.back().end = std::max(runs.back().end, r.end);
                       else runs.push_back(r);
                     }
                   } else {
                     while (i < ra.size() && j < rb.size()) {
                       const index_t lo = std::max(ra[i].begin, rb[j].begin), hi = std::min(ra[i].end, rb[j].end);
                       if (lo < hi) runs.push_back({lo, hi});
                       if (ra[i].end < rb[j].end) ++i;
                       else ++j;
                     }
                   }
                 });
  }
};

namespace detail {

// Checks that `mask` fits the attention problem `s`.
inline void validate_block_mask(std::string_view fn, const block_mask& m, const attention_shape& s) {
  const index_t nqb = ceil_div(s.q_len, m.block_q()), nkb = ceil_div(s.kv_len, m.block_k());
  const bool ok = (m.batch() == s.batch || m.batch() == 1) && (m.heads() == s.q_heads || m.heads() == 1) &&
                  m.q_blocks() == nqb && m.k_blocks() == nkb;
  if (!ok)
    fail(fn, "mask",
         concat("extents (batch, heads, q_blocks, k_blocks) = (", s.batch, ", ", s.q_heads, ", ", nqb, ", ", nkb,
                ") for blocks ", m.block_q(), " x ", m.block_k(), " (batch or heads 1 broadcasts)"),
         concat("(", m.batch(), ", ", m.heads(), ", ", m.q_blocks(), ", ", m.k_blocks(), ")"));
}

// Query rows per softmax_block in block_sparse_attention: four of flash's register blocks, for the
// reason flash groups rows (a row group streams its key tiles once, so more rows read each K/V row
// fewer times; on the Zen 5 machine 128-row groups ran a full 128 x 128 mask 1.2x faster than
// 48-row ones). Not re-measured with AVX2, where flash itself now groups 96 rows.
inline constexpr index_t block_sparse_max_rows = 4 * flash_tiles::block_q;

template <class A, class TQ, class TK, class TV, class TO, class TL>
void block_sparse_prefill(const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k, const tensor_view<TV, 4>& v,
                          const tensor_view<TO, 4>& out, const block_mask& mask, const attention_params& p,
                          const tensor_view<TL, 3>& lse, const attention_shape& s,
                          const tensor_view<const float, 4>& bias) {
  constexpr index_t BK = flash_tiles::block_k;
  const A cap = A(p.softcap);
  const kernels::score_source<A, TQ, TK> src(effective_scale<A>(p.scale, s.head_dim), s.head_dim, k.stride(3));
  const index_t mbq = mask.block_q(), mbk = mask.block_k();
  // A mask query block is split into `groups` equal row groups of at most block_sparse_max_rows.
  const index_t nqb = mask.q_blocks(), groups = ceil_div(mbq, block_sparse_max_rows), BQ = ceil_div(mbq, groups);
  parallel_for(s.batch * s.q_heads * nqb * groups, 1, [&](index_t w0, index_t w1) {
    kernels::softmax_block<A> blk;
    for (index_t w = w0; w < w1; ++w) {
      const index_t g = w % groups, qb = (w / groups) % nqb, h = (w / (groups * nqb)) % s.q_heads,
                    b = w / (groups * nqb * s.q_heads);
      const index_t q0 = qb * mbq + g * BQ, q_end = std::min((qb + 1) * mbq, s.q_len);
      if (q0 >= q_end) continue;
      const index_t hk = h / s.group(), rows = std::min(BQ, q_end - q0);
      const auto ed = kernels::make_editor<A>(p, bias, s, b, h);
      blk.start(rows, s.head_dim, s.value_dim, BK);
      src.load_queries(blk, &q(b, q0, h, 0), q.stride(1), q.stride(3));
      index_t lo_first, hi_first, lo_last, hi_last;
      ed.key_range(q0, lo_first, hi_first);
      ed.key_range(q0 + rows - 1, lo_last, hi_last);
      for (const block_range& run : mask.active(b, h, qb)) {
        const index_t r0 = std::max(run.begin * mbk, lo_first), r1 = std::min(run.end * mbk, hi_last);
        kernels::attend_key_range(blk, src, ed, cap, &k(b, 0, hk, 0), k.stride(1), k.stride(3), &v(b, 0, hk, 0),
                                  v.stride(1), v.stride(3), s.value_dim, q0, r0, r1, BK);
      }
      TL* lse_ptr = lse.data() ? &lse(b, h, q0) : nullptr;
      blk.finish(&out(b, q0, h, 0), out.stride(1), out.stride(3), lse_ptr, lse.data() ? lse.stride(2) : 0);
    }
  });
}

}  // namespace detail

// Exact softmax attention over the active tiles of `mask` (see the top of this header); q, k, v,
// out, params and lse as in flash_attention. Throws attnkit::error, before writing anything, when
// the mask's block counts do not match ceil(Nq / block_q) x ceil(Nk / block_k) or its batch / heads
// extents are neither the problem's nor 1.
template <class TQ, class TK, class TV, class TO, class TL = TO>
void block_sparse_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                            const block_mask& mask, const attention_params& p = {}, tensor_view<TL, 3> lse = {}) {
  detail::check_element_types<TQ, TK, TV, TO, TL>();
  constexpr const char* fn = "block_sparse_attention";
  const attention_shape s = detail::validate_attention(fn, q, k, v, out, p, lse);
  detail::validate_block_mask(fn, mask, s);
  if (s.batch == 0 || s.q_len == 0 || s.q_heads == 0) return;
  const auto bias = detail::broadcast_to(p.bias, {s.batch, s.q_heads, s.q_len, s.kv_len});
  detail::block_sparse_prefill<detail::softmax_accum_t<TQ>>(q, k, v, out, mask, p, lse, s, bias);
}

}  // namespace attnkit
