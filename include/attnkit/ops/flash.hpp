// flash_attention: exact softmax attention, tiled with online softmax, O(N) memory.
//
// Two paths, chosen from the shape alone (never from the thread count):
//  * prefill (more than decode_max_q query rows): work items are (batch, head, group of group_q
//    query rows); each streams the allowed key range in tiles of block_k keys through
//    kernels::softmax_block, each tile over only the query columns it is not fully masked for.
//    Elementwise masks are applied only on tiles that straddle a range boundary.
//  * decode (few query rows, typically a KV-cache step): the keys are split into chunks of up to
//    decode_chunk keys processed in parallel (Flash-Decoding); a chunk covers all heads so its
//    K/V are read in place as one stretch of memory, in an order the prefetchers follow (kv_tile),
//    every K/V row is converted once and used by all query rows of its GQA group, and the partial
//    states are merged in chunk order with merge_attention_states' formula.
// Results are bitwise identical for any number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attnkit/core/attention_params.hpp"
#include "attnkit/core/parallel.hpp"
#include "attnkit/kernels/flash_tile.hpp"
#include "attnkit/ops/reference.hpp"

namespace attnkit {

struct flash_tiles {
  static constexpr index_t block_q = kernels::gemm_nv * simd::width * (simd::width >= 16 ? 1 : 2);
  static constexpr index_t block_k = 64;
  // Query rows per prefill work item (one softmax_block): four register blocks' worth, so that each
  // K/V row, once fetched and its page translated, serves 192 queries (AVX-512). On the Intel dev
  // machine (Xeon, AVX-512, 4 KiB pages) 48-row blocks lost ~30% to re-fetching per-head K/V rows
  // 4 KiB apart; causal blocks skip the masked part column range by column range
  // (kernels::attend_key_range). With AVX2 two blocks (96 rows): on Zen 3 (L1d 32 KiB, L2 512 KiB)
  // 192 rows' Q^T, S^T and O^T tiles (240 KiB at D 128) outgrow the caches, and f32 N 2048 ran
  // 5-23% faster with 96 (2 threads, two alternated rounds; bf16 within the noise).
  static constexpr index_t group_q = (simd::width >= 16 ? 4 : 2) * block_q;
  static constexpr index_t decode_max_q = 16;   // query rows per head up to which decode is used
  static constexpr index_t decode_chunk = 512;   // keys per parallel decode chunk (at most; see flash_decode)
  static constexpr index_t decode_block = 64;   // keys per decode tile inside a chunk
};

namespace detail {

// Accumulation type of a softmax operator: double when q is double, float otherwise.
template <class TQ>
using softmax_accum_t = accum_t<std::remove_const_t<TQ>>;

template <class A, class TQ, class TK, class TV, class TO, class TL>
void flash_prefill(const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k, const tensor_view<TV, 4>& v,
                   const tensor_view<TO, 4>& out, const attention_params& p, const tensor_view<TL, 3>& lse,
                   const attention_shape& s, const tensor_view<const float, 4>& bias) {
  constexpr index_t BQ = flash_tiles::group_q, BK = flash_tiles::block_k;
  const A scale = effective_scale<A>(p.scale, s.head_dim);
  const A cap = A(p.softcap);
  const index_t nqb = (s.q_len + BQ - 1) / BQ;
  const kernels::score_source<A, TQ, TK> src(scale, s.head_dim, k.stride(3));
  parallel_for(s.batch * s.q_heads * nqb, 1, [&](index_t w0, index_t w1) {
    kernels::softmax_block<A> blk;
    for (index_t w = w0; w < w1; ++w) {
      const index_t qb = w % nqb, h = (w / nqb) % s.q_heads, b = w / (nqb * s.q_heads);
      const index_t hk = h / s.group(), q0 = qb * BQ, rows = std::min(BQ, s.q_len - q0);
      const auto ed = kernels::make_editor<A>(p, bias, s, b, h);
      blk.start(rows, s.head_dim, s.value_dim, BK);
      src.load_queries(blk, &q(b, q0, h, 0), q.stride(1), q.stride(3));
      index_t lo_first, hi_first, lo_last, hi_last;  // the group's keys: [lo_first, hi_last)
      ed.key_range(q0, lo_first, hi_first);
      ed.key_range(q0 + rows - 1, lo_last, hi_last);
      kernels::attend_key_range(blk, src, ed, cap, &k(b, 0, hk, 0), k.stride(1), k.stride(3), &v(b, 0, hk, 0),
                                v.stride(1), v.stride(3), s.value_dim, q0, lo_first, hi_last, BK);
      TL* lse_ptr = lse.data() ? &lse(b, h, q0) : nullptr;
      blk.finish(&out(b, q0, h, 0), out.stride(1), out.stride(3), lse_ptr, lse.data() ? lse.stride(2) : 0);
    }
  });
}

// Rows [k0, k0 + nk) of one batch of a K or V cache, all heads, as the decode kernels read them.
// With unit element stride the rows are read in place, in an order the hardware prefetchers
// follow: the L2 streamer tracks one ascending stream per 4 KiB page, and with heads interleaved
// (BSHD) a page holds several keys (f16, 8 heads of 128: two keys of 2 KiB), which a plain
// key-block-then-head order visits as several streams at once. So the keys of a block are visited
// page-interleaved (keys j, j + P, j + 2P, ... for every head, then j + 1, j + 1 + P, ..., P keys
// per page), sweeping each page once in ascending order, and the rows two blocks ahead are
// prefetched. Measured on the Intel dev machine (f16, Nk 32k, Hkv 8, D 128, 2 threads, a 30-call
// loop): 9.2-9.9 ms with tiles staged by a copy, 11.2 ms in place in key-block order, 6.5-6.9 ms
// interleaved, 5.7-6.0 ms interleaved and prefetched. Other element strides: converted to float
// once per tile, head-major, in scratch.
template <class T>
class kv_tile {
 public:
  kv_tile(const tensor_view<T, 4>& x, std::size_t convert_slot) : x_(x), convert_slot_(convert_slot) {
    const index_t row_bytes = x.stride(1) * index_t(sizeof(T));
    if (x.stride(2) < x.stride(1) && row_bytes > 0 && row_bytes < 4096 && 4096 % row_bytes == 0)
      interleave_ = std::min<index_t>(4096 / row_bytes, 16);
  }

  // Keys [k0, k0 + nk) of batch b; rows of keys below k_stop may be prefetched.
  void load(index_t b, index_t k0, index_t nk, index_t k_stop) {
    nk_ = nk;
    in_place_ = x_.stride(3) == 1 || x_.extent(3) <= 1;
    if (in_place_) {
      base_ = &x_(b, k0, 0, 0);
      prefetch_keys_ = k_stop - k0;
      return;
    }
    const index_t n = x_.extent(3);
    float* tile = kernels::thread_scratch<float>(convert_slot_, std::size_t(x_.extent(2) * nk * n));
    for (index_t h = 0; h < x_.extent(2); ++h)
      kernels::convert_tile(tile + h * nk * n, n, &x_(b, k0, h, 0), nk, n, x_.stride(1), x_.stride(3));
    converted_ = tile;
  }

  // Calls f(h, j, cnt, step, rows, rs) for key groups of every head h: keys j, j + step, ... (cnt
  // of them, at most per_call; the tile's key j is k0 + j) of head h, the first at rows, the next rs
  // elements further. Every key of the tile is visited once per head.
  template <class F>
  void visit(index_t per_call, F&& f) const {
    const index_t P = in_place_ ? interleave_ : 1, block = per_call * P, heads = x_.extent(2);
    for (index_t j0 = 0; j0 < nk_; j0 += block)
      for (index_t j = j0; j < std::min(j0 + P, nk_); ++j) {
        const index_t cnt = std::min(per_call, ceil_div(nk_ - j, P));
        for (index_t h = 0; h < heads; ++h) {
          if (!in_place_) {
            f(h, j, cnt, index_t(1), converted_ + (h * nk_ + j) * x_.extent(3), x_.extent(3));
            continue;
          }
          const T* rows = base_ + h * x_.stride(2) + j * x_.stride(1);
          if (j + 2 * block + (cnt - 1) * P < prefetch_keys_)
            for (index_t t = 0; t < cnt; ++t)
              simd::prefetch<2>(rows + (2 * block + t * P) * x_.stride(1), std::size_t(x_.extent(3)) * sizeof(T));
          f(h, j, cnt, P, rows, P * x_.stride(1));
        }
      }
  }

 private:
  const tensor_view<T, 4>& x_;
  std::size_t convert_slot_;
  index_t interleave_ = 1;
  const T* base_ = nullptr;
  const float* converted_ = nullptr;
  index_t nk_ = 0, prefetch_keys_ = 0;
  bool in_place_ = true;
};

// Decode. Work items are (batch, chunk of up to decode_chunk keys) over all heads, so each item reads
// one contiguous stretch of the KV cache (tile by tile through kv_tile); each kv head's K and V
// rows are converted in registers (kernels::dot_rows, accumulate_rows), each loaded once for all
// G * Nq query rows of its GQA group (row r = h * Nq + i). Per tile: scores of all heads, online
// softmax (the running output rescaled only when a row's max moved), then the values. Chunk states
// are merged in chunk order.
template <class TQ, class TK, class TV, class TO, class TL>
void flash_decode(const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k, const tensor_view<TV, 4>& v,
                  const tensor_view<TO, 4>& out, const attention_params& p, const tensor_view<TL, 3>& lse,
                  const attention_shape& s, const tensor_view<const float, 4>& bias) {
  using simd::vec;
  constexpr index_t BK = flash_tiles::decode_block;
  // Keys per call of the score pass (dot_rows' key block) and of the value pass: few, to keep the
  // cache read in address order while the pass is bound by memory (up to 4 rows per kv head), 32
  // when more rows per kv head make it bound by reloading their outputs (f16, Nk 32k, 2 threads,
  // Nq 16 x 4 heads per kv head: 4 keys per call ran 1.3x slower). Two call sites with constant
  // counts: one call with a count chosen at run time made the one-row decode 10% slower. With AVX2
  // (8 floats, 2 output vectors per register block) the one-row value pass is bound by reloading
  // its outputs already: 8 keys per call took it from 11.1 to 9.1 ms (Zen 3, f16, Nk 32k, 1 thread;
  // fastest of 20 calls), the whole decode from 18.2 to 16.8 ms.
  constexpr index_t JS = simd::width / kernels::dot_rows_r, JV = simd::width >= 16 ? 4 : 8, JV_many_rows = 32;
  const float scale = effective_scale<float>(p.scale, s.head_dim);
  const float cap = p.softcap;
  const float ninf = -std::numeric_limits<float>::infinity();
  const index_t G = s.group(), Nq = s.q_len, Hq = s.q_heads;
  const index_t R = Hq * Nq, GR = G * Nq;  // rows per item, rows per kv head
  const index_t Dp = kernels::pad_to_width(s.head_dim), Dvp = kernels::pad_to_width(s.value_dim);
  // Chunks tile only the keys some row of some batch may see ([k_begin, k_end)): with a KV cache of
  // capacity Nk holding kv_lengths[b] keys, or a window, the rest is never split or merged.
  index_t k_begin = s.kv_len, k_end = 0;
  for (index_t b = 0; b < s.batch; ++b) {
    const auto ed = kernels::make_editor<float>(p, bias, s, b, 0);
    index_t lo0, hi0, lo1, hi1;
    ed.key_range(0, lo0, hi0);
    ed.key_range(Nq - 1, lo1, hi1);
    if (lo0 < hi1) {
      k_begin = std::min(k_begin, lo0);
      k_end = std::max(k_end, hi1);
    }
  }
  if (k_end <= k_begin) k_begin = k_end = 0;
  // Chunks of decode_chunk keys, smaller (down to 4 tiles) when that gives fewer than 4 per batch,
  // so that short caches are still split across threads. Shape-only, as the results must be.
  const index_t C = std::clamp(ceil_div(ceil_div(k_end - k_begin, index_t(4)), BK) * BK, 4 * BK, flash_tiles::decode_chunk);
  const index_t nc = std::max<index_t>(1, ceil_div(k_end - k_begin, C));
  const index_t items = s.batch * nc;
  // Partial states per (item, row): normalised output (Dv) and lse. Only allocated when split.
  std::vector<float> part_o(nc > 1 ? std::size_t(items * R * s.value_dim) : 0);
  std::vector<float> part_lse(nc > 1 ? std::size_t(items * R) : 0);

  parallel_for(items, 1, [&](index_t w0, index_t w1) {
    float* qf = kernels::thread_scratch<float>(0, std::size_t(R * Dp));
    float* sc = kernels::thread_scratch<float>(1, std::size_t(R * BK));
    float* o = kernels::thread_scratch<float>(2, std::size_t(R * Dvp));
    float* stats = kernels::thread_scratch<float>(3, std::size_t(3 * R));
    float *m = stats, *l = stats + R, *ones = stats + 2 * R;
    std::fill(ones, ones + R, 1.f);
    std::vector<kernels::logit_editor<float>> eds(static_cast<std::size_t>(Hq));
    kv_tile<TK> kt(k, kernels::slot_k_tile);
    kv_tile<TV> vt(v, kernels::slot_v_tile);
    for (index_t w = w0; w < w1; ++w) {
      const index_t c = w % nc, b = w / nc;
      for (index_t h = 0; h < Hq; ++h) eds[h] = kernels::make_editor<float>(p, bias, s, b, h);
      // Keys of this chunk that any row may see (the ranges do not depend on the head).
      index_t lo0, hi0, lo1, hi1;
      eds[0].key_range(0, lo0, hi0);
      eds[0].key_range(Nq - 1, lo1, hi1);
      const index_t c0 = std::max(lo0, k_begin + c * C), c1 = std::min(hi1, k_begin + (c + 1) * C);
      for (index_t h = 0; h < Hq; ++h)
        for (index_t i = 0; i < Nq; ++i) {
          float* qr = qf + (h * Nq + i) * Dp;
          kernels::convert_tile(qr, Dp, &q(b, i, h, 0), 1, s.head_dim, 0, q.stride(3));
          simd::scale(qr, scale, Dp);
        }
      std::fill(o, o + R * Dvp, 0.f);
      std::fill(m, m + R, ninf);
      std::fill(l, l + R, 0.f);
      for (index_t k0 = c0; k0 < c1; k0 += BK) {
        const index_t nk = std::min(BK, c1 - k0);
        const bool boundary = !(k0 >= lo1 && k0 + nk <= hi0);
        kt.load(b, k0, nk, c1);
        vt.load(b, k0, nk, c1);
        kt.visit(JS, [&](index_t hk, index_t j, index_t cnt, index_t step, const auto* rows, index_t rs) {
          kernels::dot_rows(qf + hk * GR * Dp, Dp, GR, rows, rs, s.head_dim, cnt, sc + hk * GR * BK + j, BK, step);
        });
        for (index_t h = 0; h < Hq; ++h) {
          if (cap > 0)
            for (index_t r = h * Nq; r < (h + 1) * Nq; ++r) kernels::apply_softcap(sc + r * BK, nk, cap);
          eds[h].apply(sc + h * Nq * BK, 1, BK, nk, [k0](index_t jj) { return k0 + jj; }, 0, Nq, boundary);
        }
        for (index_t r = 0; r < R; ++r) {
          float* sr = sc + r * BK;
          const float mx = std::max(m[r], simd::max_of(sr, nk));
          const float safe = kernels::safe_max(mx);
          const float alpha = std::exp(m[r] - safe);
          vec sum(0.f);
          index_t jj = 0;
          for (; jj + simd::width <= nk; jj += simd::width) {
            const vec pj = simd::exp(simd::load(sr + jj) - vec(safe));
            simd::store(sr + jj, pj);
            sum += pj;
          }
          if (jj < nk) {
            const vec pj = simd::exp(simd::load_tail(sr + jj, nk - jj, ninf) - vec(safe));
            simd::store_tail(sr + jj, pj, nk - jj);
            sum += pj;
          }
          // NaN logits are skipped by max_of but not by exp: they reach l and so the output.
          l[r] = l[r] * alpha + simd::hsum(sum);
          m[r] = mx;
          if (alpha != 1.f) simd::scale(o + r * Dvp, alpha, Dvp);
        }
        const auto values = [&](index_t hk, index_t j, index_t cnt, index_t step, const auto* rows, index_t rs) {
          kernels::accumulate_rows(o + hk * GR * Dvp, Dvp, GR, ones, sc + hk * GR * BK + j, BK, rows, rs,
                                   s.value_dim, cnt, step);
        };
        if (GR <= 4) vt.visit(JV, values);
        else vt.visit(JV_many_rows, values);
      }
      // Normalise; write the final rows directly when there is a single chunk.
      for (index_t r = 0; r < R; ++r) {
        const index_t h = r / Nq, i = r % Nq;
        const bool empty = l[r] == 0.f;
        const float inv = empty ? 0.f : 1.f / l[r];
        const float row_lse = empty ? ninf : m[r] + std::log(l[r]);
        if (nc == 1) {
          for (index_t e = 0; e < s.value_dim; ++e) out(b, i, h, e) = TO(o[r * Dvp + e] * inv);
          if (lse.data()) lse(b, h, i) = TL(row_lse);
        } else {
          float* po = part_o.data() + (w * R + r) * s.value_dim;
          for (index_t e = 0; e < s.value_dim; ++e) po[e] = o[r * Dvp + e] * inv;
          part_lse[std::size_t(w * R + r)] = row_lse;
        }
      }
    }
  });
  if (nc == 1) return;
  // Merge the chunks of every row in chunk order.
  parallel_for(s.batch * R, 16, [&](index_t x0, index_t x1) {
    std::vector<float> acc(static_cast<std::size_t>(s.value_dim));
    for (index_t x = x0; x < x1; ++x) {
      const index_t r = x % R, b = x / R, h = r / Nq, i = r % Nq;
      const index_t w_first = b * nc;
      float run_lse = part_lse[std::size_t(w_first * R + r)];
      const float* po = part_o.data() + (w_first * R + r) * s.value_dim;
      std::copy(po, po + s.value_dim, acc.begin());
      for (index_t c = 1; c < nc; ++c) {
        const index_t w = w_first + c;
        const auto mw = kernels::merge_lse(run_lse, part_lse[std::size_t(w * R + r)]);
        const float* pc = part_o.data() + (w * R + r) * s.value_dim;
        for (index_t e = 0; e < s.value_dim; ++e) acc[e] = mw.w_a * acc[e] + mw.w_b * pc[e];
        run_lse = mw.lse;
      }
      for (index_t e = 0; e < s.value_dim; ++e) out(b, i, h, e) = TO(acc[e]);
      if (lse.data()) lse(b, h, i) = TL(run_lse);
    }
  });
}

}  // namespace detail

// Exact softmax attention with the semantics of reference_attention (see DESIGN.md and
// attention_params), computed tile by tile with online softmax: no Nq x Nk buffer anywhere.
// q, k, v: float, double, bf16 or f16 (float accumulation; double when q is double).
template <class TQ, class TK, class TV, class TO, class TL = TO>
void flash_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                     const attention_params& p = {}, tensor_view<TL, 3> lse = {}) {
  detail::check_element_types<TQ, TK, TV, TO, TL>();
  const attention_shape s = detail::validate_attention("flash_attention", q, k, v, out, p, lse);
  if (s.batch == 0 || s.q_len == 0 || s.q_heads == 0) return;
  const auto bias = detail::broadcast_to(p.bias, {s.batch, s.q_heads, s.q_len, s.kv_len});
  using A = detail::softmax_accum_t<TQ>;
  if (std::is_same_v<A, float> && s.q_len <= flash_tiles::decode_max_q && s.kv_len > 0)
    detail::flash_decode(q, k, v, out, p, lse, s, bias);
  else
    detail::flash_prefill<A>(q, k, v, out, p, lse, s, bias);
}

// Combines two partial attention results over disjoint key sets of the same queries:
//   lse = log(exp(lse_a) + exp(lse_b)),  o = (exp(lse_a - lse) o_a + exp(lse_b - lse) o_b).
// A side with lse -inf (it saw no key) contributes nothing; both -inf give o = 0 and lse = -inf.
// o may be the same view as o_a or o_b (in-place merge). lse may be empty (not written).
template <class TA, class TLA, class TB, class TLB, class TO, class TL = TO>
void merge_attention_states(tensor_view<TA, 4> o_a, tensor_view<TLA, 3> lse_a, tensor_view<TB, 4> o_b,
                            tensor_view<TLB, 3> lse_b, tensor_view<TO, 4> o, tensor_view<TL, 3> lse = {}) {
  static_assert(is_output_element_v<std::remove_const_t<TA>> && is_output_element_v<std::remove_const_t<TB>> &&
                    is_output_element_v<std::remove_const_t<TLA>> && is_output_element_v<std::remove_const_t<TLB>>,
                "partial states must be float or double");
  static_assert(is_output_element_v<TO> && is_output_element_v<TL>, "o and lse must be (non-const) float or double");
  constexpr const char* fn = "merge_attention_states";
  const index_t B = o_a.extent(0), N = o_a.extent(1), H = o_a.extent(2), D = o_a.extent(3);
  detail::require_extents(fn, "o_b", o_b, {B, N, H, D}, "(batch, seq, head, dim) as o_a");
  detail::require_extents(fn, "o", o, {B, N, H, D}, "(batch, seq, head, dim) as o_a");
  detail::require_writable(fn, "o", o);
  detail::require_extents(fn, "lse_a", lse_a, {B, H, N}, "(batch, head, seq)");
  detail::require_extents(fn, "lse_b", lse_b, {B, H, N}, "(batch, head, seq)");
  if (lse.data() || !lse.empty()) {
    detail::require_extents(fn, "lse", lse, {B, H, N}, "(batch, head, seq)");
    detail::require_writable(fn, "lse", lse);
  }
  using A = std::conditional_t<std::is_same_v<TO, double>, double, float>;
  parallel_for(B * N * H, 64, [&](index_t r0, index_t r1) {
    for (index_t r = r0; r < r1; ++r) {
      const index_t h = r % H, i = (r / H) % N, b = r / (H * N);
      const auto mw = kernels::merge_lse<A>(A(lse_a(b, h, i)), A(lse_b(b, h, i)));
      for (index_t e = 0; e < D; ++e) {
        const A a = mw.w_a == A(0) ? A(0) : mw.w_a * A(o_a(b, i, h, e));
        const A c = mw.w_b == A(0) ? A(0) : mw.w_b * A(o_b(b, i, h, e));
        o(b, i, h, e) = TO(a + c);
      }
      if (lse.data()) lse(b, h, i) = TL(mw.lse);
    }
  });
}

}  // namespace attnkit
