// The tile machinery of exact softmax attention with online softmax, shared by flash, sparse and
// block-sparse attention.
//
// softmax_block keeps one block of query rows of one head *transposed*: queries are the SIMD lanes.
// For a tile of keys it forms S^T = K Q^T (keys x queries) with kernels::gemm_set, lets the caller
// edit the logits (softcap, bias, ALiBi, masks: logit_editor), runs the online-softmax update
// column-wise (per query: running max m, running sum l, rescale factor alpha), and accumulates
// O^T = O^T * alpha + V^T P^T with kernels::gemm_acc. Because the queries are the lanes, K and V
// are read in place through any strides (element broadcasts), the row statistics are plain
// vector max/add across tile rows, and no horizontal reduction is ever needed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>

#include "attnkit/core/attention_params.hpp"
#include "attnkit/kernels/gemm.hpp"
#include "attnkit/kernels/online_softmax.hpp"
#include "attnkit/kernels/scratch.hpp"
#include "attnkit/simd/simd.hpp"

namespace attnkit::kernels {

// Scratch slots used by this header (kernels/scratch.hpp): 0..4 by softmax_block, 5..6 by
// operators' K/V conversion tiles.
inline constexpr std::size_t slot_k_tile = 5, slot_v_tile = 6;

// dst[r * ld + c] = A(src[r * rs + c * cs]) for r < rows, c < cols, and 0 for cols <= c < ld.
template <class A, class T>
void convert_tile(A* dst, index_t ld, const T* src, index_t rows, index_t cols, index_t rs, index_t cs) {
  for (index_t r = 0; r < rows; ++r) {
    A* d = dst + r * ld;
    const T* s = src + r * rs;
    if constexpr (std::is_same_v<A, float>) {
      if (cs == 1) {
        simd::convert_row(d, s, cols);
      } else {
        for (index_t c = 0; c < cols; ++c) d[c] = convert<A>(s[c * cs]);
      }
    } else {
      for (index_t c = 0; c < cols; ++c) d[c] = convert<A>(s[c * cs]);
    }
    for (index_t c = cols; c < ld; ++c) d[c] = A(0);
  }
}

// softcap * tanh(x / softcap) over n contiguous logits.
template <class A>
void apply_softcap(A* x, index_t n, A cap) {
  index_t i = 0;
  if constexpr (std::is_same_v<A, float>) {
    const simd::vec c(cap), inv(1.f / cap);
    for (; i + simd::width <= n; i += simd::width) simd::store(x + i, c * xsimd::tanh(simd::load(x + i) * inv));
  }
  for (; i < n; ++i) x[i] = cap * std::tanh(x[i] / cap);
}

// Logit edits of one (batch, head): additive bias, ALiBi, and the causal/window key-range mask.
// (softcap is applied before, with apply_softcap, since it acts on the raw scaled logit.)
template <class A>
struct logit_editor {
  tensor_view<const float, 2> bias{};  // (query row, key) of this (batch, head); empty: none
  A slope = 0;                         // ALiBi slope of this head
  bool alibi = false;
  attention_mask mask{};
  index_t len = 0;     // keys that exist (kv_lengths[b] or Nk)
  index_t offset = 0;  // len - Nq: the bottom-right diagonal

  bool has_additive() const { return bias.data() != nullptr || alibi; }

  void key_range(index_t i, index_t& lo, index_t& hi) const { mask.key_range(i, len, offset, lo, hi); }

  // Edits the logit of key key_at(jj) (jj < nk) and query q0 + c (c < rows), stored at
  // s[jj * key_stride + c * query_stride]: adds bias and ALiBi, and with check_mask sets -inf
  // where the key is outside the query's allowed range.
  template <class KeyAt>
  void apply(A* s, index_t key_stride, index_t query_stride, index_t nk, KeyAt&& key_at, index_t q0, index_t rows,
             bool check_mask) const {
    if (!check_mask && !has_additive()) return;
    const A ninf = -std::numeric_limits<A>::infinity();
    for (index_t c = 0; c < rows; ++c) {
      const index_t i = q0 + c;
      index_t lo = 0, hi = len;
      if (check_mask) key_range(i, lo, hi);
      A* col = s + c * query_stride;
      for (index_t jj = 0; jj < nk; ++jj) {
        const index_t j = key_at(jj);
        A& x = col[jj * key_stride];
        if (j < lo || j >= hi) {
          x = ninf;
          continue;
        }
        if (bias.data()) x += A(bias(i, j));
        if (alibi) x -= slope * A(std::abs(i + offset - j));
      }
    }
  }
};

// Pointer to a K or V tile readable in the accumulation type A: the original memory when the
// element type already is A, else a converted copy in the thread's scratch slot (padded rows of
// `ld` = cols elements, so the returned strides are (ld, 1)).
template <class A, class T>
const A* tile_as(const T* src, index_t rows, index_t cols, index_t rs, index_t cs, std::size_t slot,
                 index_t& out_rs, index_t& out_cs) {
  if constexpr (std::is_same_v<std::remove_const_t<T>, A>) {
    out_rs = rs;
    out_cs = cs;
    return src;
  } else {
    A* dst = thread_scratch<A>(slot, std::size_t(std::max<index_t>(rows * cols, 1)));
    convert_tile(dst, cols, src, rows, cols, rs, cs);
    out_rs = cols;
    out_cs = 1;
    return dst;
  }
}

template <class A>
logit_editor<A> make_editor(const attention_params& p, const tensor_view<const float, 4>& bias,
                                     const attention_shape& s, index_t b, index_t h) {
  logit_editor<A> e;
  if (bias.data()) e.bias = bias.fix(0, b).fix(0, h);
  if (p.alibi_slopes) {
    e.alibi = true;
    e.slope = A(p.alibi_slopes[h]);
  }
  e.mask = attention_mask{p.causal, p.window_left, p.window_right};
  e.len = p.kv_lengths ? p.kv_lengths[b] : s.kv_len;
  e.offset = e.len - s.q_len;
  return e;
}

template <class A>
class softmax_block {
 public:
  // Prepares for `rows` query rows with head dim `d`, value dim `dv`, and key tiles of up to
  // `max_keys` keys. Uses scratch slots 0..4 of the calling thread.
  void start(index_t rows, index_t d, index_t dv, index_t max_keys) {
    rows_ = rows;
    d_ = d;
    dv_ = dv;
    ld_ = pad_to_width(std::max<index_t>(rows, 1));
    qt_ = thread_scratch<A>(0, std::size_t(std::max<index_t>(d, 1) * ld_));
    st_ = thread_scratch<A>(1, std::size_t(max_keys * ld_));
    ot_ = thread_scratch<A>(2, std::size_t(std::max<index_t>(dv, 1) * ld_));
    A* stats = thread_scratch<A>(3, std::size_t(3 * ld_));
    m_ = stats;
    l_ = stats + ld_;
    alpha_ = stats + 2 * ld_;
    std::fill(ot_, ot_ + dv * ld_, A(0));
    std::fill(m_, m_ + ld_, -std::numeric_limits<A>::infinity());
    std::fill(l_, l_ + ld_, A(0));
  }

  // Q^T[d][c] = scale * q[c * row_stride + d * dim_stride]; padding columns are 0. Contiguous float
  // rows are transposed width x width in registers.
  template <class T>
  void load_queries(const T* q, index_t row_stride, index_t dim_stride, A scale) {
    index_t c0 = 0;
    if constexpr (std::is_same_v<A, float>) {
      constexpr index_t W = simd::width;
      for (; dim_stride == 1 && c0 + W <= rows_; c0 += W) {
        index_t dd = 0;
        for (; dd + W <= d_; dd += W) {
          simd::vec b[W];
          for (index_t i = 0; i < W; ++i) b[i] = simd::load(q + (c0 + i) * row_stride + dd) * simd::vec(scale);
          simd::transpose(b);
          for (index_t j = 0; j < W; ++j) simd::store(qt_ + (dd + j) * ld_ + c0, b[j]);
        }
        for (; dd < d_; ++dd)
          for (index_t c = c0; c < c0 + W; ++c) qt_[dd * ld_ + c] = scale * convert<A>(q[c * row_stride + dd]);
      }
    }
    for (index_t dd = 0; dd < d_; ++dd) {
      A* row = qt_ + dd * ld_;
      for (index_t c = c0; c < rows_; ++c) row[c] = scale * convert<A>(q[c * row_stride + dd * dim_stride]);
      for (index_t c = rows_; c < ld_; ++c) row[c] = A(0);
    }
  }

#if defined(__AVX512BF16__) && defined(__AVX512F__)
  // bf16 queries kept unscaled as bf16 pairs, for scores_bf16 (head dim must be even).
  void load_queries_bf16(const bf16* q, index_t row_stride, index_t dim_stride) {
    static_assert(std::is_same_v<A, float>);
    auto* q2 = reinterpret_cast<std::uint32_t*>(qt_);  // d/2 rows of ld pairs fit in qt_'s d x ld floats
    for (index_t dp = 0; dp < d_ / 2; ++dp)
      for (index_t c = 0; c < ld_; ++c) {
        std::uint16_t lo = 0, hi = 0;
        if (c < rows_) {
          lo = Eigen::numext::bit_cast<std::uint16_t>(q[c * row_stride + 2 * dp * dim_stride]);
          hi = Eigen::numext::bit_cast<std::uint16_t>(q[c * row_stride + (2 * dp + 1) * dim_stride]);
        }
        q2[dp * ld_ + c] = std::uint32_t(lo) | (std::uint32_t(hi) << 16);
      }
  }

  // S^T = scale * K Q^T with bf16 keys (contiguous elements) through the BF16 dot-product
  // instructions; queries loaded with load_queries_bf16.
  A* scores_bf16(const bf16* k, index_t key_stride, index_t nk, A scale, index_t c0, index_t c1) {
    gemm_bf16_set(nk, c1 - c0, d_ / 2, k, key_stride, reinterpret_cast<const std::uint32_t*>(qt_) + c0, ld_, st_ + c0,
                  ld_, scale);
    return st_;
  }
#endif

  // The tile steps below act on the query columns [c0, c1) only (whole vectors: c0 a multiple of
  // simd::width, c1 one or ld()), so that a tile can skip the queries it is fully masked for; a
  // column's arithmetic never depends on which other columns take part.

  // S^T (nk x ld) = K Q^T for keys at k[jj * key_stride + d * dim_stride]. Returns S^T, row-major
  // with leading dimension ld(), for the caller to edit before update().
  A* scores(const A* k, index_t key_stride, index_t dim_stride, index_t nk, index_t c0, index_t c1) {
    gemm_set(nk, c1 - c0, d_, k, key_stride, dim_stride, qt_ + c0, ld_, st_ + c0, ld_);
    return st_;
  }
  A* scores(const A* k, index_t key_stride, index_t dim_stride, index_t nk) {
    return scores(k, key_stride, dim_stride, nk, 0, ld_);
  }

  // Online-softmax step over the nk edited logit rows of S^T; leaves P^T in their place.
  void update(index_t nk) { update(nk, 0, ld_); }
  void update(index_t nk, index_t c0, index_t c1) {
    if constexpr (std::is_same_v<A, float>) {
      using simd::vec;
      const vec ninf(-std::numeric_limits<float>::infinity()), zero(0.f);
      for (index_t c = c0; c < c1; c += simd::width) {
        vec mx = simd::load(m_ + c);
        for (index_t jj = 0; jj < nk; ++jj) mx = xsimd::max(mx, simd::load(st_ + jj * ld_ + c));
        const vec safe = xsimd::select(mx == ninf, zero, mx);
        const vec alpha = simd::exp(simd::load(m_ + c) - safe);
        vec sum(0.f);
        for (index_t jj = 0; jj < nk; ++jj) {
          const vec p = simd::exp(simd::load(st_ + jj * ld_ + c) - safe);
          simd::store(st_ + jj * ld_ + c, p);
          sum += p;
        }
        simd::store(l_ + c, simd::fma(simd::load(l_ + c), alpha, sum));
        simd::store(m_ + c, mx);
        simd::store(alpha_ + c, alpha);
      }
    } else {
      for (index_t c = c0; c < c1; ++c) {
        A mx = m_[c];
        for (index_t jj = 0; jj < nk; ++jj) mx = std::max(mx, st_[jj * ld_ + c]);
        const A safe = safe_max(mx);
        const A alpha = std::exp(m_[c] - safe);
        A sum = 0;
        for (index_t jj = 0; jj < nk; ++jj) {
          A& x = st_[jj * ld_ + c];
          x = std::exp(x - safe);
          sum += x;
        }
        l_[c] = l_[c] * alpha + sum;
        m_[c] = mx;
        alpha_[c] = alpha;
      }
    }
  }

  // O^T = O^T * alpha + V^T P^T for values at v[jj * key_stride + e * dim_stride].
  void accumulate(const A* v, index_t key_stride, index_t dim_stride, index_t nk) {
    accumulate(v, key_stride, dim_stride, nk, 0, ld_);
  }
  void accumulate(const A* v, index_t key_stride, index_t dim_stride, index_t nk, index_t c0, index_t c1) {
    gemm_acc(dv_, c1 - c0, nk, v, dim_stride, key_stride, st_ + c0, ld_, ot_ + c0, ld_, alpha_ + c0);
  }

  // Writes out[c * row_stride + e * dim_stride] = O^T[e][c] / l[c] and lse[c * lse_stride] (if lse)
  // for c < rows. A row that saw no key (l = 0) gets 0 and -inf; NaN propagates.
  template <class TO, class TL>
  void finish(TO* out, index_t row_stride, index_t dim_stride, TL* lse, index_t lse_stride) const {
    const auto inv_of = [this](index_t c) { return l_[c] == A(0) ? A(0) : A(1) / l_[c]; };
    index_t c0 = 0;
    if constexpr (std::is_same_v<A, float> && std::is_same_v<TO, float>) {
      // Contiguous float rows: O^T transposed width x width in registers.
      constexpr index_t W = simd::width;
      for (; dim_stride == 1 && c0 + W <= rows_; c0 += W) {
        index_t e = 0;
        for (; e + W <= dv_; e += W) {
          simd::vec b[W];
          for (index_t j = 0; j < W; ++j) b[j] = simd::load(ot_ + (e + j) * ld_ + c0);
          simd::transpose(b);
          for (index_t i = 0; i < W; ++i) simd::store(out + (c0 + i) * row_stride + e, b[i] * simd::vec(inv_of(c0 + i)));
        }
        for (index_t c = c0; c < c0 + W; ++c)
          for (index_t ee = e; ee < dv_; ++ee) out[c * row_stride + ee] = ot_[ee * ld_ + c] * inv_of(c);
      }
    }
    for (index_t c = c0; c < rows_; ++c) {
      const A inv = inv_of(c);
      for (index_t e = 0; e < dv_; ++e) out[c * row_stride + e * dim_stride] = TO(ot_[e * ld_ + c] * inv);
    }
    if (lse)
      for (index_t c = 0; c < rows_; ++c)
        lse[c * lse_stride] = l_[c] == A(0) ? -std::numeric_limits<TL>::infinity() : TL(m_[c] + std::log(l_[c]));
  }

  index_t ld() const { return ld_; }
  index_t rows() const { return rows_; }

 private:
  index_t rows_ = 0, d_ = 0, dv_ = 0, ld_ = 0;
  A *qt_ = nullptr, *st_ = nullptr, *ot_ = nullptr, *m_ = nullptr, *l_ = nullptr, *alpha_ = nullptr;
};

// How a softmax operator forms S^T for queries of TQ and keys of TK: with the AVX-512 BF16 pair
// dot products when both are bf16 and simd::prefer_bf16_dot (even head dim, unit dim stride on k),
// else on float (double) tiles. Operators that must agree bit for bit (flash, block-sparse) share it.
template <class A, class TQ, class TK>
class score_source {
  static constexpr bool pairs_possible = simd::prefer_bf16_dot && std::is_same_v<A, float> &&
                                         std::is_same_v<std::remove_const_t<TQ>, bf16> &&
                                         std::is_same_v<std::remove_const_t<TK>, bf16>;

 public:
  score_source(A scale, index_t head_dim, index_t k_dim_stride) : scale_(scale), head_dim_(head_dim) {
    pairs_ = pairs_possible && head_dim % 2 == 0 && k_dim_stride == 1;
  }

  void load_queries(softmax_block<A>& blk, const TQ* q, index_t row_stride, index_t dim_stride) const {
    if constexpr (pairs_possible) {
      if (pairs_) return blk.load_queries_bf16(q, row_stride, dim_stride);
    }
    blk.load_queries(q, row_stride, dim_stride, scale_);
  }

  A* scores(softmax_block<A>& blk, const TK* k, index_t key_stride, index_t dim_stride, index_t nk, index_t c0,
            index_t c1) const {
    if constexpr (pairs_possible) {
      if (pairs_) return blk.scores_bf16(k, key_stride, nk, scale_, c0, c1);
    }
    index_t rs, cs;
    const A* kt = tile_as<A>(k, nk, head_dim_, key_stride, dim_stride, slot_k_tile, rs, cs);
    return blk.scores(kt, rs, cs, nk, c0, c1);
  }

 private:
  A scale_;
  index_t head_dim_;
  bool pairs_ = false;
};

// One tile of nk consecutive keys k0.. (K and V rows at k/v with the given strides) through the
// query columns [c0, c1) of blk (query rows q0 + c): scores, softcap, bias/ALiBi and (on boundary
// tiles) masks, online softmax, values.
template <class A, class Source, class TK, class TV>
void attend_key_tile(softmax_block<A>& blk, const Source& src, const logit_editor<A>& ed, A softcap,
                     const TK* k, index_t k_stride, index_t k_dim_stride, const TV* v, index_t v_stride,
                     index_t v_dim_stride, index_t value_dim, index_t k0, index_t nk, index_t q0, bool boundary,
                     index_t c0, index_t c1) {
  const index_t ld = blk.ld();
  A* st = src.scores(blk, k, k_stride, k_dim_stride, nk, c0, c1);
  if (softcap > 0)
    for (index_t jj = 0; jj < nk; ++jj) apply_softcap(st + jj * ld + c0, c1 - c0, softcap);
  ed.apply(st + c0, ld, 1, nk, [k0](index_t jj) { return k0 + jj; }, q0 + c0, std::min(c1, blk.rows()) - c0,
           boundary);
  blk.update(nk, c0, c1);
  index_t vrs, vcs;
  const A* vt = tile_as<A>(v, nk, value_dim, v_stride, v_dim_stride, slot_v_tile, vrs, vcs);
  blk.accumulate(vt, vrs, vcs, nk, c0, c1);
}

// Streams the keys [r0, r1) through blk (its rows are query rows q0..) in tiles of
// flash_tiles-style `tile` keys starting at r0; k and v point at key 0 of the (batch, kv head).
// Each tile runs only over the whole vectors of query columns whose allowed key ranges (ed) meet
// it, and masks elementwise only when some of those rows' ranges do not cover it. Relies on the
// allowed range [lo, hi) of row i being nondecreasing in i (causal, windows, kv_lengths are).
// Many rows per block make each K/V row, once loaded (and its page translated), serve many queries;
// the column ranges keep causal blocks from paying for the masked triangle.
template <class A, class Source, class TK, class TV>
void attend_key_range(softmax_block<A>& blk, const Source& src, const logit_editor<A>& ed, A softcap,
                      const TK* k, index_t k_stride, index_t k_dim_stride, const TV* v, index_t v_stride,
                      index_t v_dim_stride, index_t value_dim, index_t q0, index_t r0, index_t r1, index_t tile) {
  constexpr index_t W = std::is_same_v<A, float> ? simd::width : 1;
  const index_t rows = blk.rows(), chunks = (rows + W - 1) / W;
  const auto lo_of = [&](index_t c) { index_t lo, hi; ed.key_range(q0 + c, lo, hi); return lo; };
  const auto hi_of = [&](index_t c) { index_t lo, hi; ed.key_range(q0 + c, lo, hi); return hi; };
  index_t first = 0;  // active chunks [first, last): a suffix by hi, a prefix by lo
  for (index_t k0 = r0; k0 < r1; k0 += tile) {
    const index_t nk = std::min(tile, r1 - k0);
    while (first < chunks && hi_of(std::min((first + 1) * W, rows) - 1) <= k0) ++first;
    index_t last = first;
    while (last < chunks && lo_of(last * W) < k0 + nk) ++last;
    if (first >= last) continue;
    const index_t c0 = first * W, c1 = last == chunks ? blk.ld() : last * W;
    const bool boundary = !(lo_of(std::min(c1, rows) - 1) <= k0 && hi_of(c0) >= k0 + nk);
    attend_key_tile(blk, src, ed, softcap, k + k0 * k_stride, k_stride, k_dim_stride, v + k0 * v_stride, v_stride,
                    v_dim_stride, value_dim, k0, nk, q0, boundary, c0, c1);
  }
}

}  // namespace attnkit::kernels
