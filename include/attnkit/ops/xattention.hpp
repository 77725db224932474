// xattention_select: XAttention's antidiagonal block selection (Xu et al. 2025) producing a
// block_mask for block_sparse_attention.
//
// Definition, per (batch b, query head h, kv head hk = h / (Hq / Hkv)), with s = stride,
// B = block (a multiple of s), g = B / s strided groups per block, off = Nk - Nq:
//   * Rows are grouped in runs of s: query group I holds rows I*s .. I*s + s-1 (I < ceil(Nq / s)),
//     key group J holds keys J*s .. J*s + s-1 (J < ceil(Nk / s)); rows past Nq or Nk count as zero
//     vectors (a partial last group).
//   * A[I, J] = sum_{t=0}^{s-1} q_{I*s + (s-1-t)} . k_{J*s + t}: the sum of the antidiagonal (lower
//     left to upper right) of the s x s cell (I, J) of Q K^T. It is one GEMM of the reshaped Q
//     (each group's s rows concatenated in reversed order, length s*d) with the reshaped K (each
//     group's rows concatenated in order).
//   * p[I, J] = softmax over J of (scale * A[I, J] / s), scale = params.scale or 1/sqrt(d). When
//     causal, J > I + floor(off / s) is excluded (p = 0); a row I with no allowed J has p = 0.
//   * The score of tile (qb, kb) is S[qb, kb] = sum of p[I, J] over the I of query block qb
//     (I in [qb*g, (qb+1)*g)) and the J of key block kb, normalised by its row: score = S / sum_kb S.
//   * Per query block, the selection is the fewest key blocks, taken by decreasing score (ties to
//     the lower index), whose cumulative score reaches params.threshold, chosen among the reachable
//     blocks (those holding an allowed (I, J) cell: all blocks unless causal). Threshold 1 keeps
//     every reachable block. Always kept in addition: the diagonal blocks (the key blocks holding
//     the bottom-right aligned diagonal keys i + off of the block's rows i) and the first key block
//     (attention sink); when causal, any of these lying wholly in the future of the block's last
//     row is dropped, so a causal selection never contains a future block.
//   * A NaN score (NaN in the inputs) sorts last and makes its block row keep every reachable block.
//
// Cost per head: Nq Nk d / s multiply-adds (the GEMM: (Nq / s)(Nk / s) cells of s d each, s times
// fewer than Q K^T itself) and Nq Nk / s^2 exponentials. Implementation: work items are (batch, head, run of
// query blocks with about 2 * gemm_nv SIMD vectors of query groups); the query groups are the SIMD
// lanes (as in kernels::softmax_block), packed once per item as s matrices d x lanes (scale / s
// folded in); key groups are streamed in chunks of xattention_chunk groups, read in place when the
// element type is the accumulation type; for each chunk, s kernels::gemm_acc calls (one per t, the
// K-dimension of the single GEMM split in order) form A, followed by an online softmax whose
// per-block partial sums are kept with the running maximum they refer to and rescaled at the end.
// Fixed work split: results are bitwise identical for any number of threads.
//
// reference_xattention_scores / reference_xattention_select evaluate the same definition directly
// in double precision (the oracle of the tests).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attnkit/core/attention_params.hpp"
#include "attnkit/core/parallel.hpp"
#include "attnkit/kernels/flash_tile.hpp"
#include "attnkit/kernels/gemm.hpp"
#include "attnkit/kernels/scratch.hpp"
#include "attnkit/ops/block_sparse.hpp"
#include "attnkit/ops/reference.hpp"

namespace attnkit {

struct xattention_params {
  index_t block = 128;     // square blocks; must be a multiple of stride
  index_t stride = 8;
  float threshold = 0.9f;  // cumulative attention mass to keep per query block, in (0, 1]
  bool causal = false;     // bottom-right aligned, as attention_params::causal
  float scale = 0.f;       // 0 -> 1/sqrt(d)
};

namespace detail {

inline constexpr std::size_t slot_xattention = 7;  // kernels/scratch.hpp slot of the selection's buffers
inline constexpr index_t xattention_chunk = 64;     // key groups per streamed chunk

// Sizes of an XAttention problem (the q/k part of attention_shape) and the block geometry of the
// definition above.
struct xattn_geometry : attention_shape {
  index_t s = 1, block = 1, g = 1;       // stride, block, groups per block
  index_t gq = 0, gk = 0, nqb = 0, nkb = 0;
  index_t off = 0, off_s = 0;            // Nk - Nq and floor(off / s)
  bool causal = false;

  index_t last_row(index_t qb) const { return std::min(q_len, (qb + 1) * block) - 1; }
  // Largest allowed key group of query group I (causal), or gk - 1.
  index_t j_limit(index_t I) const { return causal ? std::min(gk - 1, I + off_s) : gk - 1; }
  // Reachable tile: some allowed strided cell (I, J) inside it.
  bool reachable(index_t qb, index_t kb) const {
    return !causal || kb * g <= std::min(gq, (qb + 1) * g) - 1 + off_s;
  }
  // Key blocks [lo, hi) holding the diagonal keys of qb's rows, and whether the sink is kept.
  void always_kept(index_t qb, index_t& lo, index_t& hi, bool& sink) const {
    const index_t first = qb * block, last = last_row(qb);
    lo = std::clamp<index_t>(floor_div(first + off, block), 0, nkb);
    hi = std::clamp<index_t>(floor_div(last + off, block) + 1, 0, nkb);
    if (hi < lo) hi = lo;
    sink = nkb > 0 && (!causal || last + off >= 0);
  }
};

template <class TQ, class TK>
xattn_geometry validate_xattention(std::string_view fn, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                                   const xattention_params& xp) {
  static_assert(is_input_element_v<std::remove_const_t<TQ>> && is_input_element_v<std::remove_const_t<TK>>,
                "q, k elements must be float, double, attnkit::bf16 or attnkit::f16");
  xattn_geometry g;
  static_cast<attention_shape&>(g) = validate_qk(fn, q, k);
  require(xp.stride >= 1, fn, "params.stride", "a value >= 1", xp.stride);
  require(xp.block >= 1, fn, "params.block", "a value >= 1", xp.block);
  require(xp.block % xp.stride == 0, fn, "params.block", text("a multiple of params.stride ", xp.stride), xp.block);
  require(std::isfinite(xp.threshold) && xp.threshold > 0.f && xp.threshold <= 1.f, fn, "params.threshold",
          "a value in (0, 1]", xp.threshold);
  require(std::isfinite(xp.scale), fn, "params.scale", "a finite value (0 for 1/sqrt(head_dim))", xp.scale);
  g.s = xp.stride;
  g.block = xp.block;
  g.g = xp.block / xp.stride;
  g.gq = ceil_div(g.q_len, g.s);
  g.gk = ceil_div(g.kv_len, g.s);
  g.nqb = ceil_div(g.q_len, g.block);
  g.nkb = ceil_div(g.kv_len, g.block);
  g.off = g.kv_len - g.q_len;
  g.off_s = floor_div(g.off, g.s);
  g.causal = xp.causal;
  return g;
}

// The selection rule (see the top of this header) for one query block from its normalised tile
// scores `score[kb]`; appends the chosen blocks to `runs`. `order` and `keep` are work buffers.
template <class S>
void xattention_choose(const xattn_geometry& g, index_t qb, const S* score, double threshold,
                       std::vector<index_t>& order, std::vector<unsigned char>& keep, std::vector<block_range>& runs) {
  keep.assign(std::size_t(g.nkb), 0);
  order.clear();
  for (index_t kb = 0; kb < g.nkb; ++kb)
    if (g.reachable(qb, kb)) order.push_back(kb);
  const auto key = [&](index_t kb) {
    const double x = double(score[kb]);
    return std::isnan(x) ? -1.0 : x;
  };
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return key(a) > key(b); });
  double cum = 0;
  for (index_t kb : order) {
    if (threshold < 1.0 && cum >= threshold) break;
    keep[std::size_t(kb)] = 1;
    cum += double(score[kb]);
  }
  index_t lo, hi;
  bool sink;
  g.always_kept(qb, lo, hi, sink);
  for (index_t kb = lo; kb < hi; ++kb) keep[std::size_t(kb)] = 1;
  if (sink) keep[0] = 1;
  for (index_t kb = 0; kb < g.nkb; ++kb)
    if (keep[std::size_t(kb)]) append_block(runs, kb);
}

// The fast scores: calls emit(b, h, qb, const double* scores) once per (b, h, qb) with the
// normalised scores of its nkb tiles (from the thread that computed them).
template <class A, class TQ, class TK, class Emit>
void xattention_compute(const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k, const xattn_geometry& g,
                        float scale_param, Emit&& emit) {
  constexpr index_t W = std::is_same_v<A, float> ? simd::width : 1;
  constexpr index_t CJ = xattention_chunk;
  const index_t s = g.s, D = g.head_dim, gpb = g.g, nkb = g.nkb;
  // Query blocks per item: about 2 * gemm_nv vectors of query groups as lanes (each key row is
  // read once per item; 96 lanes ran 10% faster than 48 at N = 32k on the development machine).
  const index_t lanes_target = 2 * kernels::gemm_nv * simd::width;
  const index_t qbpi = std::max<index_t>(1, lanes_target / gpb);
  const index_t items_per_head = ceil_div(g.nqb, qbpi);
  const A qscale = effective_scale<A>(scale_param, D) / A(s);
  const A ninf = -std::numeric_limits<A>::infinity();
  parallel_for(g.batch * g.q_heads * items_per_head, 1, [&](index_t w0, index_t w1) {
    std::vector<double> norm(static_cast<std::size_t>(nkb));
    for (index_t w = w0; w < w1; ++w) {
      const index_t it = w % items_per_head, h = (w / items_per_head) % g.q_heads, b = w / (items_per_head * g.q_heads);
      const index_t hk = h / g.group();
      const index_t qb0 = it * qbpi, qb1 = std::min(g.nqb, qb0 + qbpi);
      const index_t I0 = qb0 * gpb, nI = std::min(qb1 * gpb, g.gq) - I0;
      const index_t ld = (nI + W - 1) / W * W;
      // Scratch: packed Q (s x D x ld), chunk logits (CJ x ld), m, l, safe (ld each), per-block
      // partial sums and their reference maxima (nkb x ld each), converted K chunk (CJ*s x D),
      // one row of block probabilities (ld).
      const std::size_t n_qp = std::size_t(s * D * ld), n_c = std::size_t(CJ * ld), n_t = std::size_t(nkb * ld),
                        n_k = std::size_t(CJ * s * D);
      A* base = kernels::thread_scratch<A>(slot_xattention, n_qp + n_c + 4 * std::size_t(ld) + 2 * n_t + n_k);
      A *qp = base, *c = qp + n_qp, *m = c + n_c, *l = m + ld, *safe = l + ld, *prow = safe + ld, *T = prow + ld,
        *mat = T + n_t, *kbuf = mat + n_t;
      for (index_t t = 0; t < s; ++t)
        for (index_t dd = 0; dd < D; ++dd) {
          A* row = qp + (t * D + dd) * ld;
          for (index_t i = 0; i < ld; ++i) {
            const index_t r = (I0 + i) * s + (s - 1 - t);
            row[i] = i < nI && r < g.q_len ? qscale * convert<A>(q(b, r, h, dd)) : A(0);
          }
        }
      std::fill(m, m + ld, ninf);
      std::fill(l, l + ld, A(0));
      std::fill(T, T + n_t, A(0));
      std::fill(mat, mat + n_t, A(0));
      const index_t j_end = g.causal ? std::clamp<index_t>(I0 + nI - 1 + g.off_s + 1, 0, g.gk) : g.gk;
      for (index_t J0 = 0; J0 < j_end; J0 += CJ) {
        const index_t nJ = std::min(CJ, j_end - J0);
        // K rows of the chunk: in place, or converted / zero-padded into kbuf.
        const A* a = nullptr;
        index_t rs_row = 0, cs = 0;
        if constexpr (std::is_same_v<std::remove_const_t<TK>, A>) {
          if ((J0 + nJ) * s <= g.kv_len) {
            a = &k(b, J0 * s, hk, 0);
            rs_row = k.stride(1);
            cs = k.stride(3);
          }
        }
        if (a == nullptr) {
          for (index_t r = 0; r < nJ * s; ++r) {
            const index_t row = J0 * s + r;
            if (row < g.kv_len) kernels::convert_tile(kbuf + r * D, D, &k(b, row, hk, 0), 1, D, 0, k.stride(3));
            else std::fill(kbuf + r * D, kbuf + (r + 1) * D, A(0));
          }
          a = kbuf;
          rs_row = D;
          cs = 1;
        }
        for (index_t t = 0; t < s; ++t) {
          if (t == 0) kernels::gemm_set(nJ, ld, D, a, s * rs_row, cs, qp, ld, c, ld);
          else kernels::gemm_acc(nJ, ld, D, a + t * rs_row, s * rs_row, cs, qp + t * D * ld, ld, c, ld);
        }
        if (g.causal)  // key group J is excluded for lanes i < J - off_s - I0
          for (index_t jj = 0; jj < nJ; ++jj) {
            const index_t cut = std::min(ld, J0 + jj - g.off_s - I0);
            for (index_t i = 0; i < cut; ++i) c[jj * ld + i] = ninf;
          }
        // Online softmax over the chunk's rows, per lane; block partial sums T[kb] refer to mat[kb].
        const index_t kb_first = J0 / gpb, kb_last = (J0 + nJ - 1) / gpb;
        const bool open = J0 % gpb != 0;  // kb_first was started by the previous chunk
        if constexpr (std::is_same_v<A, float>) {
          using simd::vec;
          for (index_t i = 0; i < ld; i += W) {
            vec mx = simd::load(m + i);
            for (index_t jj = 0; jj < nJ; ++jj) mx = xsimd::max(mx, simd::load(c + jj * ld + i));
            const vec sf = xsimd::select(mx == vec(ninf), vec(0.f), mx);
            const vec alpha = simd::exp(simd::load(m + i) - sf);
            vec lsum = simd::load(l + i) * alpha;
            for (index_t kb = kb_first; kb <= kb_last; ++kb) {
              A* tk = T + kb * ld + i;
              const vec before = kb == kb_first && open ? simd::load(tk) * alpha : vec(0.f);
              vec fresh(0.f);
              const index_t j0 = std::max(J0, kb * gpb) - J0, j1 = std::min(J0 + nJ, (kb + 1) * gpb) - J0;
              for (index_t jj = j0; jj < j1; ++jj) fresh += simd::exp(simd::load(c + jj * ld + i) - sf);
              simd::store(tk, before + fresh);
              simd::store(mat + kb * ld + i, sf);
              lsum += fresh;
            }
            simd::store(l + i, lsum);
            simd::store(m + i, mx);
          }
        } else {
          for (index_t i = 0; i < ld; ++i) {
            A mx = m[i];
            for (index_t jj = 0; jj < nJ; ++jj) mx = std::max(mx, c[jj * ld + i]);
            const A sf = kernels::safe_max(mx);
            const A alpha = std::exp(m[i] - sf);
            A lsum = l[i] * alpha;
            for (index_t kb = kb_first; kb <= kb_last; ++kb) {
              A* tk = T + kb * ld + i;
              A acc = kb == kb_first && open ? *tk * alpha : A(0);
              A fresh = 0;
              const index_t j0 = std::max(J0, kb * gpb) - J0, j1 = std::min(J0 + nJ, (kb + 1) * gpb) - J0;
              for (index_t jj = j0; jj < j1; ++jj) fresh += std::exp(c[jj * ld + i] - sf);
              *tk = acc + fresh;
              mat[kb * ld + i] = sf;
              lsum += fresh;
            }
            l[i] = lsum;
            m[i] = mx;
          }
        }
      }
      // Block probabilities p(I, kb) = T[kb] exp(mat[kb] - safe) / l, summed over each query block's lanes.
      for (index_t i = 0; i < ld; ++i) safe[i] = kernels::safe_max(m[i]);
      std::vector<A> tile(static_cast<std::size_t>((qb1 - qb0) * nkb), A(0));
      for (index_t kb = 0; kb < nkb; ++kb) {
        for (index_t i = 0; i < nI; ++i)
          prow[i] = T[kb * ld + i] == A(0) ? A(0) : T[kb * ld + i] * std::exp(mat[kb * ld + i] - safe[i]) / l[i];
        for (index_t qb = qb0; qb < qb1; ++qb) {
          A sum = 0;
          for (index_t i = (qb - qb0) * gpb; i < std::min(nI, (qb - qb0 + 1) * gpb); ++i) sum += prow[i];
          tile[std::size_t((qb - qb0) * nkb + kb)] = sum;
        }
      }
      for (index_t qb = qb0; qb < qb1; ++qb) {
        const A* row = tile.data() + (qb - qb0) * nkb;
        double total = 0;
        for (index_t kb = 0; kb < nkb; ++kb) total += double(row[kb]);
        // total is 0 only when every score is 0; NaN poisons the whole row (see the top of this header).
        for (index_t kb = 0; kb < nkb; ++kb)
          norm[std::size_t(kb)] = total > 0 ? double(row[kb]) / total : std::isnan(total) ? total : 0.0;
        emit(b, h, qb, norm.data());
      }
    }
  });
}

}  // namespace detail

// Normalised XAttention tile scores (the definition at the top of this header) into `scores`,
// logical (batch, q_head, q_block, k_block) with q_blocks = ceil(Nq / block), k_blocks =
// ceil(Nk / block); 0 for unreachable tiles. Throws attnkit::error, writing nothing, on bad input.
template <class TQ, class TK, class TS>
void xattention_scores(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TS, 4> scores,
                       const xattention_params& xp = {}) {
  static_assert(is_output_element_v<TS>, "scores must be (non-const) float or double");
  constexpr const char* fn = "xattention_scores";
  const auto g = detail::validate_xattention(fn, q, k, xp);
  detail::require_extents(fn, "scores", scores, {g.batch, g.q_heads, g.nqb, g.nkb},
                          "(batch, head, q_blocks, k_blocks)");
  if (g.batch == 0 || g.q_heads == 0 || g.nqb == 0 || g.nkb == 0) {
    for (index_t b = 0; b < g.batch; ++b)
      for (index_t h = 0; h < g.q_heads; ++h)
        for (index_t qb = 0; qb < g.nqb; ++qb)
          for (index_t kb = 0; kb < g.nkb; ++kb) scores(b, h, qb, kb) = TS(0);
    return;
  }
  detail::xattention_compute<accum_t<TQ>>(q, k, g, xp.scale, [&](index_t b, index_t h, index_t qb, const double* x) {
    for (index_t kb = 0; kb < g.nkb; ++kb) scores(b, h, qb, kb) = TS(x[kb]);
  });
}

// The XAttention block selection (definition at the top of this header) as a block_mask with
// block_q = block_k = params.block and extents (batch, q_heads, ceil(Nq / block), ceil(Nk / block)).
template <class TQ, class TK>
block_mask xattention_select(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, const xattention_params& xp = {}) {
  const auto g = detail::validate_xattention("xattention_select", q, k, xp);
  const index_t rows = g.batch * g.q_heads * g.nqb;
  std::vector<std::vector<block_range>> chosen(static_cast<std::size_t>(rows));
  if (g.nkb > 0 && rows > 0) {
    detail::xattention_compute<accum_t<TQ>>(q, k, g, xp.scale, [&](index_t b, index_t h, index_t qb, const double* x) {
      thread_local std::vector<index_t> order;
      thread_local std::vector<unsigned char> keep;
      detail::xattention_choose(g, qb, x, double(xp.threshold), order, keep,
                                chosen[std::size_t((b * g.q_heads + h) * g.nqb + qb)]);
    });
  }
  return block_mask::build(g.block, g.block, g.batch, g.q_heads, g.nqb, g.nkb, false, false,
                           [&](index_t b, index_t h, index_t qb, std::vector<block_range>& runs) {
                             const auto& r = chosen[std::size_t((b * g.q_heads + h) * g.nqb + qb)];
                             runs.insert(runs.end(), r.begin(), r.end());
                           });
}

namespace detail {

// Direct evaluation of the definition in double: A[I, J] cell by cell, p row by row, S tile by tile.
// O(Nq Nk d / s) per head. reach(b, h, qb, kb) records whether the tile holds an allowed cell.
template <class TQ, class TK>
void reference_xattention(const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k, const xattn_geometry& g,
                          float scale_param, std::vector<double>& score, std::vector<unsigned char>& reach) {
  const double scale = effective_scale<double>(scale_param, g.head_dim);
  const index_t s = g.s;
  const std::size_t tiles = std::size_t(g.batch * g.q_heads * g.nqb * g.nkb);
  score.assign(tiles, 0.0);
  reach.assign(tiles, 0);
  const auto qv = [&](index_t b, index_t r, index_t h, index_t d) { return r < g.q_len ? convert<double>(q(b, r, h, d)) : 0.0; };
  const auto kv = [&](index_t b, index_t r, index_t h, index_t d) { return r < g.kv_len ? convert<double>(k(b, r, h, d)) : 0.0; };
  std::vector<double> x(static_cast<std::size_t>(g.gk));
  std::vector<unsigned char> allowed(static_cast<std::size_t>(g.gk));
  for (index_t b = 0; b < g.batch; ++b)
    for (index_t h = 0; h < g.q_heads; ++h) {
      const index_t hk = h / g.group();
      const std::size_t base = std::size_t((b * g.q_heads + h) * g.nqb * g.nkb);
      for (index_t I = 0; I < g.gq; ++I) {
        double mx = -std::numeric_limits<double>::infinity();
        for (index_t J = 0; J < g.gk; ++J) {
          allowed[std::size_t(J)] = !g.causal || J <= I + g.off_s;
          double a = 0;
          for (index_t t = 0; t < s; ++t)
            for (index_t d = 0; d < g.head_dim; ++d) a += qv(b, I * s + (s - 1 - t), h, d) * kv(b, J * s + t, hk, d);
          x[std::size_t(J)] = scale * a / double(s);
          if (allowed[std::size_t(J)]) mx = std::max(mx, x[std::size_t(J)]);
        }
        double sum = 0;
        for (index_t J = 0; J < g.gk; ++J)
          if (allowed[std::size_t(J)]) sum += std::exp(x[std::size_t(J)] - mx);
        const index_t qb = I / g.g;
        for (index_t J = 0; J < g.gk; ++J) {
          if (!allowed[std::size_t(J)]) continue;
          const std::size_t tile = base + std::size_t(qb * g.nkb + J / g.g);
          reach[tile] = 1;
          score[tile] += std::exp(x[std::size_t(J)] - mx) / sum;
        }
      }
      for (index_t qb = 0; qb < g.nqb; ++qb) {
        double total = 0;
        for (index_t kb = 0; kb < g.nkb; ++kb) total += score[base + std::size_t(qb * g.nkb + kb)];
        if (total > 0 || std::isnan(total))
          for (index_t kb = 0; kb < g.nkb; ++kb) score[base + std::size_t(qb * g.nkb + kb)] /= total;
      }
    }
}

}  // namespace detail

// The definition evaluated directly in double precision: normalised tile scores (as
// xattention_scores).
template <class TQ, class TK>
void reference_xattention_scores(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<double, 4> scores,
                                 const xattention_params& xp = {}) {
  constexpr const char* fn = "reference_xattention_scores";
  const auto g = detail::validate_xattention(fn, q, k, xp);
  detail::require_extents(fn, "scores", scores, {g.batch, g.q_heads, g.nqb, g.nkb}, "(batch, head, q_blocks, k_blocks)");
  std::vector<double> sc;
  std::vector<unsigned char> reach;
  detail::reference_xattention(q, k, g, xp.scale, sc, reach);
  for (index_t b = 0; b < g.batch; ++b)
    for (index_t h = 0; h < g.q_heads; ++h)
      for (index_t qb = 0; qb < g.nqb; ++qb)
        for (index_t kb = 0; kb < g.nkb; ++kb)
          scores(b, h, qb, kb) = sc[std::size_t(((b * g.q_heads + h) * g.nqb + qb) * g.nkb + kb)];
}

// The definition evaluated directly: reference scores, then for each query block a full sort of its
// reachable blocks and the cumulative cut, plus the diagonal blocks and the sink found row by row.
template <class TQ, class TK>
block_mask reference_xattention_select(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, const xattention_params& xp = {}) {
  const auto g = detail::validate_xattention("reference_xattention_select", q, k, xp);
  std::vector<double> sc;
  std::vector<unsigned char> reach;
  detail::reference_xattention(q, k, g, xp.scale, sc, reach);
  return block_mask::build(
      g.block, g.block, g.batch, g.q_heads, g.nqb, g.nkb, false, false,
      [&](index_t b, index_t h, index_t qb, std::vector<block_range>& runs) {
        const std::size_t base = std::size_t(((b * g.q_heads + h) * g.nqb + qb) * g.nkb);
        std::vector<index_t> cand;
        for (index_t kb = 0; kb < g.nkb; ++kb)
          if (reach[base + std::size_t(kb)]) cand.push_back(kb);
        const auto key = [&](index_t kb) {
          const double x = sc[base + std::size_t(kb)];
          return std::isnan(x) ? -1.0 : x;
        };
        std::sort(cand.begin(), cand.end(), [&](index_t a, index_t c) {
          return key(a) > key(c) || (key(a) == key(c) && a < c);
        });
        std::vector<unsigned char> keep(static_cast<std::size_t>(g.nkb), 0);
        double cum = 0;
        // Until the cumulative score reaches the threshold (a NaN sum never does).
        for (std::size_t n = 0; n < cand.size() && (xp.threshold >= 1.f || !(cum >= double(xp.threshold))); ++n) {
          keep[std::size_t(cand[n])] = 1;
          cum += sc[base + std::size_t(cand[n])];
        }
        const index_t first = qb * g.block, last = std::min(g.q_len, first + g.block) - 1;
        for (index_t i = first; i <= last; ++i) {
          const index_t diag = i + g.off;
          if (diag >= 0 && diag < g.kv_len) keep[std::size_t(diag / g.block)] = 1;
        }
        bool sink = g.nkb > 0;
        if (g.causal) sink = sink && last + g.off >= 0;
        if (sink) keep[0] = 1;
        for (index_t kb = 0; kb < g.nkb; ++kb)
          if (keep[std::size_t(kb)]) detail::append_block(runs, kb);
      });
}

}  // namespace attnkit
