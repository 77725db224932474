// Circular-convolutional attention (CAT; Yamada, "CAT: Circular-Convolutional Attention for
// Sub-Quadratic Transformers", 2025): the N x N attention matrix is replaced by a circulant matrix
// built from one softmax-normalized vector per head, applied with FFTs in O(N log N).
//
// Definition. Per batch b and head h, with w = softmax_j(logits[b, h, j]) over the sequence (length N):
//   non-causal: out[b, i, h, :] = sum_j w[(i - j) mod N] * v[b, j, h, :]
//               (circular convolution of w with every value channel);
//   causal:     out[b, i, h, :] = sum_{j <= i} w[i - j] * v[b, j, h, :]
//               (the linear convolution truncated to N rows: row i keeps the weight mass w[0..i]);
//   causal + renormalize: row i is divided by sum_{m <= i} w[m], so every row's weights sum to 1.
//               Equivalently row i uses softmax over logits[0..i] alone; it is evaluated in that form,
//               so it stays exact where the global weights of a prefix underflow.
// renormalize without causal changes nothing (non-causal rows already sum to 1).
// Logits of -inf are legal; a head whose logits are all -inf (a causal+renormalize row whose prefix
// is all -inf) gets output 0. A NaN or +inf logit makes the head NaN (for causal+renormalize: the
// rows at or after it). A non-finite value in v makes exactly the output rows it reaches NaN
// (non-causal: every row of that channel; causal: rows i >= its position).
//
// Entry points:
//   circular_attention            the fast operator (FFT, float arithmetic, O(N log N) per head and channel)
//   reference_circular_attention  the O(N^2) definition in double: the oracle of the tests
//   averaged_key_logits           CAT's averaged-key variant with separate Q and K:
//                                 logits[b, h, i] = scale * q[b, i, h, :] . mean_j k[b, j, h_kv, :]
//
// How circular_attention computes. Heads are processed in groups of simd::width (batch and head
// flattened). For a group: each head's softmax weights (max-subtracted, exp in float, sums in double)
// fill one SIMD lane of a buffer whose forward FFT gives every head's filter spectrum at once. Then,
// in parallel over fixed work units (one head x some 2 * simd::width channels), the unit's values are
// packed into a channel-pair buffer (kernels/fft.hpp: one lane per channel, two channel blocks as the
// real and imaginary parts), transformed, multiplied by the head's spectrum and transformed back.
// Transform length M: N when N is 2^a 3^b 5^c and the attention is non-causal (the circular
// convolution is then exactly the length-N cyclic one); otherwise the smallest 2^a 3^b 5^c >= 2N - 1,
// which turns the cyclic convolution of length M into the exact linear one, truncated to N rows
// (causal) or folded back modulo N (non-causal: out[i] = y[i] + y[i + N]).
//
// causal + renormalize. The FFT's error is absolute, about float epsilon times the total weight mass,
// so dividing row i by its prefix mass c_i amplifies it by (total / c_i): hopeless for early rows
// when N is large. Rows with c_i >= tau * total (tau = 1/8) are taken from the ordinary causal
// convolution (relative error <= 8x the FFT's). The remaining rows form a prefix [0, R) and are
// solved per head by solve(o, L): rows o + i' (i' < L) from lags o + m' (m' <= i') with values
// v[i' - m']; each FFT piece exponentiates its lags relative to their own maximum logit A, and row
// i gets the piece times exp(A - P_i) / d_i (P_i, d_i: the row's prefix maximum and mass, in double).
//   L <= 32: direct sums;
//   i0 = the first row whose prefix mass reaches tau of the mass of all L lags. If i0 <= L/2: a
//        causal piece (all L lags, linear convolution) for rows [i0, L), which own >= tau of its
//        mass, then solve(o, i0);
//   else: a piece with lags [o, o + L/2) for rows [L/2, L) (those lags precede the rows, so A <= P_i;
//        a cyclic length >= L suffices), then solve(o, L/2) and solve(o + L/2, L - L/2).
// Every row thus sums pieces, each accurate relative to weight mass the row owns. Cost: O(N log N)
// when the prefix mass grows steadily (random logits: R is about N/8), O(N log^2 N) in the worst case
// (steeply increasing logits); the recursion's filter spectra are single-lane FFTs, so this mode costs
// extra.
//
// Precision. float, bf16 and f16 inputs are converted to float; double inputs are rounded to float
// too (the transform is float throughout); out may be float or double. Expect a max-abs error around
// 1e-6 of max|v| for moderate N (it grows slowly, like log M).
//
// Work units. A unit takes as many of a head's channel block pairs as fit 32 MiB of transform buffers
// (all of them up to N = 64k for D = 128 with AVX-512; one beyond), so that packing reads each v row
// as one run of up to D channels: rows are H * D elements apart and, once v is out of cache, the
// number of row visits bounds the packing speed.
//
// Memory. No allocation proportional to N x H x D: per thread, grow-only transform scratch of
// max(32 MiB, M * 2 * simd::width floats) at most (kept between calls;
// kernels::fft_release_thread_scratch() frees the calling thread's), plus on the calling thread the
// group's spectra and weights (simd::width * 3 * M floats at most) and O(N) temporaries; renormalize
// adds O(N) per thread. Example: N = 256k, causal, AVX-512: M = 512k, 64 MiB per thread. Results are
// bitwise identical for any thread count (fixed work units, fixed order).
//
// out must not overlap logits or v.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attnkit/core/attention_params.hpp"
#include "attnkit/core/parallel.hpp"
#include "attnkit/kernels/fft.hpp"
#include "attnkit/simd/simd.hpp"

namespace attnkit {

struct circular_params {
  bool causal = false;       // row i sees values j <= i only (the linear convolution truncated to N)
  bool renormalize = false;  // causal rows divided by their weight mass sum_{m <= i} w[m]
};

namespace detail {

struct circular_shape {
  index_t batch = 0, heads = 0, seq = 0, dim = 0;
};

template <class TL, class TV, class TO>
void check_circular_types() {
  static_assert(is_input_element_v<std::remove_const_t<TL>> && is_input_element_v<std::remove_const_t<TV>>,
                "logits and v elements must be float, double, attnkit::bf16 or attnkit::f16");
  static_assert(is_output_element_v<TO>, "out elements must be (non-const) float or double");
}

template <class TL, class TV, class TO>
circular_shape validate_circular(std::string_view fn, const tensor_view<TL, 3>& logits, const tensor_view<TV, 4>& v,
                                 const tensor_view<TO, 4>& out) {
  circular_shape s;
  s.batch = logits.extent(0);
  s.heads = logits.extent(1);
  s.seq = logits.extent(2);
  s.dim = v.extent(3);
  require(v.extent(0) == s.batch, fn, "v", text("batch extent ", s.batch, " (as logits)"), v.extent(0));
  require(v.extent(1) == s.seq, fn, "v", text("sequence length ", s.seq, " (as logits)"), v.extent(1));
  require(v.extent(2) == s.heads, fn, "v", text("head count ", s.heads, " (as logits)"), v.extent(2));
  require_extents(fn, "out", out, {s.batch, s.seq, s.heads, s.dim}, "(batch, seq, head, dim)");
  // The transform length is < 4N and a unit's scratch is M * 2 * simd::width floats.
  require(s.seq <= (index_t(1) << 40), fn, "logits", "a sequence length <= 2^40", s.seq);
  require_writable(fn, "out", out);
  return s;
}

}  // namespace detail

// ---- the definition, in double ---------------------------------------------------------------------

// O(N^2 D) per head; clarity over speed. See the top of this file for the definition.
template <class TL, class TV, class TO>
void reference_circular_attention(tensor_view<TL, 3> logits, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                                  const circular_params& p = {}) {
  detail::check_circular_types<TL, TV, TO>();
  const auto s = detail::validate_circular("reference_circular_attention", logits, v, out);
  const index_t N = s.seq, D = s.dim;
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  parallel_for(s.batch * s.heads, 1, [&](index_t u0, index_t u1) {
    std::vector<double> l(static_cast<std::size_t>(N)), w(static_cast<std::size_t>(N)), acc(static_cast<std::size_t>(D));
    for (index_t u = u0; u < u1; ++u) {
      const index_t b = u / s.heads, h = u % s.heads;
      for (index_t j = 0; j < N; ++j) l[j] = convert<double>(logits(b, h, j));
      if (p.causal && p.renormalize) {
        // Row i: softmax over logits[0..i] alone.
        double m = -inf;
        bool bad = false;
        for (index_t i = 0; i < N; ++i) {
          if (std::isnan(l[i])) bad = true;
          m = std::max(m, l[i]);
          std::fill(acc.begin(), acc.end(), 0.0);
          double den = 0;
          if (!bad && m > -inf)
            for (index_t k = 0; k <= i; ++k) {
              const double e = std::exp(l[k] - m);
              den += e;
              for (index_t d = 0; d < D; ++d) acc[d] += e * convert<double>(v(b, i - k, h, d));
            }
          for (index_t d = 0; d < D; ++d)
            out(b, i, h, d) = static_cast<TO>(bad || std::isnan(den) ? nan : m == -inf ? 0.0 : acc[d] / den);
        }
        continue;
      }
      double m = -inf;
      bool bad = false;
      for (index_t j = 0; j < N; ++j) {
        if (std::isnan(l[j])) bad = true;
        m = std::max(m, l[j]);
      }
      double sum = 0;
      for (index_t j = 0; j < N; ++j) {
        w[j] = bad ? nan : m == -inf ? 0.0 : std::exp(l[j] - m);
        sum += w[j];
      }
      if (m > -inf)
        for (auto& x : w) x /= sum;
      for (index_t i = 0; i < N; ++i) {
        std::fill(acc.begin(), acc.end(), 0.0);
        const index_t jmax = p.causal ? i : N - 1;
        for (index_t j = 0; j <= jmax; ++j) {
          const double wij = w[(i - j + N) % N];
          for (index_t d = 0; d < D; ++d) acc[d] += wij * convert<double>(v(b, j, h, d));
        }
        for (index_t d = 0; d < D; ++d) out(b, i, h, d) = static_cast<TO>(acc[d]);
      }
    }
  });
}

// ---- the fast operator -----------------------------------------------------------------------------

namespace detail::cat {

inline constexpr index_t W = simd::width;
inline constexpr index_t E = kernels::fft_elem;  // floats per element of a channel-pair buffer
inline constexpr double renorm_tau = 1.0 / 8;     // accepted fraction of a piece's weight mass
inline constexpr index_t renorm_direct = 32;      // solve() sums directly at or below this length

// Scratch slots of kernels::fft_thread_scratch: the unit's transform buffer, the calling thread's group
// spectra, and a renormalize piece's spectrum.
inline constexpr int slot_work = 0, slot_group = 1, slot_piece = 2;

using simd::vec;

// Lanes [0, n) of channels at p[c * sd], converted to float; 0 beyond n.
template <class T>
inline vec load_channels(const T* p, index_t sd, index_t n) {
  if constexpr (!std::is_same_v<std::remove_const_t<T>, double>) {
    if (sd == 1 && n == W) return simd::load(p);
  }
  alignas(64) float tmp[W];
  for (index_t c = 0; c < W; ++c) tmp[c] = c < n ? convert<float>(p[c * sd]) : 0.f;
  return vec::load_aligned(tmp);
}

template <bool Accumulate, class T>
inline void store_channels(T* p, index_t sd, index_t n, const vec& x) {
  if constexpr (std::is_same_v<T, float>) {
    if (sd == 1 && n == W) {
      simd::store(p, Accumulate ? x + simd::load(p) : x);
      return;
    }
  }
  alignas(64) float tmp[W];
  x.store_aligned(tmp);
  for (index_t c = 0; c < n; ++c) {
    if constexpr (Accumulate) p[c * sd] = static_cast<T>(p[c * sd] + static_cast<T>(tmp[c]));
    else p[c * sd] = static_cast<T>(tmp[c]);
  }
}

// Rows ahead at which v is prefetched for reading and out for writing. One head's rows of a BSHD
// tensor are H * D elements apart, often a new 4 KiB page per row, which the hardware prefetchers
// do not run into. Intel dev machine, H 8, 2 threads, N 8k / 64k: D 128 13.0 / 174 -> 10.0 / 147 ms,
// D 64 5.8 / 83 -> 5.3 / 72 ms (3 alternated runs each).
inline constexpr index_t prefetch_rows = 16;

// The channel block pair of one work unit: channels [c0, c0 + na) in the real parts, [c0 + W, c0 + W + nb)
// in the imaginary parts.
struct block_pair {
  index_t c0 = 0, na = 0, nb = 0;
};

inline block_pair make_block_pair(index_t D, index_t blk) {
  block_pair bp;
  bp.c0 = blk * 2 * W;
  bp.na = std::min(W, D - bp.c0);
  bp.nb = std::clamp<index_t>(D - bp.c0 - W, 0, W);
  return bp;
}

// Reads element m of a unit's channel-pair sequence: v[b, m, h, block pair] for m < rows, zero
// beyond. Non-finite values read as 0 and are remembered (saw_nonfinite()).
template <class TV>
class value_reader {
 public:
  value_reader(const tensor_view<TV, 4>& v, index_t b, index_t h, const block_pair& bp, index_t rows)
      : base_(v.data() + b * v.stride(0) + h * v.stride(2) + bp.c0 * v.stride(3)),
        ss_(v.stride(1)), sd_(v.stride(3)), na_(bp.na), nb_(bp.nb), rows_(rows) {}

  [[gnu::always_inline]] void operator()(index_t m, float* dst) {
    const vec zero(0.f);
    if (m >= rows_) {
      simd::store(dst, zero);
      simd::store(dst + W, zero);
      return;
    }
    const TV* row = base_ + m * ss_;
    if (m + prefetch_rows < rows_ && sd_ == 1) simd::prefetch<2>(row + prefetch_rows * ss_, prefetch_bytes_);
    const vec a = load_channels(row, sd_, na_);
    const vec c = nb_ > 0 ? load_channels(row + W * sd_, sd_, nb_) : zero;
    const vec big(FLT_MAX);
    const auto oa = xsimd::abs(a) <= big, oc = xsimd::abs(c) <= big;
    ok_ = ok_ & oa & oc;
    simd::store(dst, xsimd::select(oa, a, zero));
    simd::store(dst + W, xsimd::select(oc, c, zero));
  }
  bool saw_nonfinite() const { return !xsimd::all(ok_); }
  // Bytes prefetched per row from the block pair's first channel (default: the pair's own channels).
  // Readers of neighbouring pairs that visit the same row together let the first prefetch for all.
  void set_prefetch_bytes(std::size_t bytes) { prefetch_bytes_ = bytes; }

 private:
  const TV* base_;
  index_t ss_, sd_, na_, nb_, rows_;
  std::size_t prefetch_bytes_ = std::size_t(na_ + nb_) * sizeof(TV);
  xsimd::batch_bool<float, simd::arch> ok_ = vec(0.f) == vec(0.f);  // all lanes true
};

// Packs v[b, 0..rows, h, block pair] into buf (elements 0..rows) and zeroes elements rows..M.
// Non-finite values are packed as 0; returns true when there was one.
template <class TV>
bool pack_values(const tensor_view<TV, 4>& v, index_t b, index_t h, const block_pair& bp, index_t rows, index_t M,
                 float* buf) {
  value_reader<TV> rd(v, b, h, bp, rows);
  for (index_t j = 0; j < rows; ++j) rd(j, buf + j * E);
  std::fill(buf + rows * E, buf + M * E, 0.f);
  return rd.saw_nonfinite();
}

// Writes (or adds) rows of a unit's result to out[b, row, h, block pair].
template <bool Accumulate, class TO>
class row_writer {
 public:
  row_writer(const tensor_view<TO, 4>& out, index_t b, index_t h, const block_pair& bp)
      : base_(out.data() + b * out.stride(0) + h * out.stride(2) + bp.c0 * out.stride(3)),
        os_(out.stride(1)), od_(out.stride(3)), na_(bp.na), nb_(bp.nb), rows_(out.extent(1)) {}
  [[gnu::always_inline]] void operator()(index_t row, const vec& re, const vec& im) const {
    TO* p = base_ + row * os_;
    if (od_ == 1 && row + prefetch_rows < rows_) simd::prefetch<2, 1>(p + prefetch_rows * os_, prefetch_bytes_);
    store_channels<Accumulate>(p, od_, na_, re);
    if (nb_ > 0) store_channels<Accumulate>(p + W * od_, od_, nb_, im);
  }
  // As value_reader::set_prefetch_bytes.
  void set_prefetch_bytes(std::size_t bytes) { prefetch_bytes_ = bytes; }

 private:
  TO* base_;
  index_t os_, od_, na_, nb_, rows_;
  std::size_t prefetch_bytes_ = std::size_t(na_ + nb_) * sizeof(TO);
};

// The channels of a block pair, in lane order (A block, then B block).
inline index_t block_channel(const block_pair& bp, index_t k) { return k < bp.na ? bp.c0 + k : bp.c0 + W + (k - bp.na); }

// After a unit saw a non-finite value: sets out[b, i, h, c] = NaN for the rows in [row_begin, row_end)
// that value reaches (every row when `all_rows`, else rows >= its position).
template <class TV, class TO>
void poison_rows(const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out, index_t b, index_t h,
                 const block_pair& bp, index_t rows_seen, bool all_rows, index_t row_begin, index_t row_end) {
  const TO nan = std::numeric_limits<TO>::quiet_NaN();
  for (index_t k = 0; k < bp.na + bp.nb; ++k) {
    const index_t c = block_channel(bp, k);
    index_t first = rows_seen;
    for (index_t j = 0; j < rows_seen; ++j)
      if (!std::isfinite(convert<double>(v(b, j, h, c)))) {
        first = j;
        break;
      }
    if (first == rows_seen) continue;
    for (index_t i = std::max(row_begin, all_rows ? index_t(0) : first); i < row_end; ++i) out(b, i, h, c) = nan;
  }
}

// Multiplies the elements of positions [pos0, pos0 + n) by the complex scalars spec[2 pos], spec[2 pos + 1].
inline void multiply_spectrum(const float* spec, index_t pos0, index_t n, float* elems) {
  for (index_t k = 0; k < n; ++k) {
    const float* s = spec + 2 * (pos0 + k);
    float* e = elems + k * E;
    const vec re = simd::load(e), im = simd::load(e + W), sr(s[0]), si(s[1]);
    simd::store(e, xsimd::fms(re, sr, im * si));
    simd::store(e + W, xsimd::fma(re, si, im * sr));
  }
}

// Writes (or adds) rows [r0, r1) of the transformed buffer to out rows row_offset + i, times
// factor[i - r0] when given; with fold_n > 0 row i is y[i] + y[i + fold_n] (when inside the buffer).
template <bool Accumulate, class TO>
void unpack_rows(const float* buf, index_t M, index_t r0, index_t r1, index_t fold_n, const float* factor,
                 const tensor_view<TO, 4>& out, index_t b, index_t h, const block_pair& bp, index_t row_offset) {
  const index_t os = out.stride(1), od = out.stride(3);
  TO* base = out.data() + b * out.stride(0) + h * out.stride(2) + bp.c0 * od;
  for (index_t i = r0; i < r1; ++i) {
    vec re = simd::load(buf + i * E), im = simd::load(buf + i * E + W);
    if (fold_n > 0 && i + fold_n < M) {
      re += simd::load(buf + (i + fold_n) * E);
      im += simd::load(buf + (i + fold_n) * E + W);
    }
    if (factor) {
      const vec f(factor[i - r0]);
      re *= f;
      im *= f;
    }
    TO* row = base + (row_offset + i) * os;
    if (od == 1 && i + prefetch_rows < r1)
      simd::prefetch<2, 1>(row + prefetch_rows * os, std::size_t(bp.na + bp.nb) * sizeof(TO));
    store_channels<Accumulate>(row, od, bp.na, re);
    if (bp.nb > 0) store_channels<Accumulate>(row + W * od, od, bp.nb, im);
  }
}

// Convolves a unit's values v[b, 0..rows, h, block pair] (zero-padded to the plan's length M) with
// the scrambled filter spectrum spec, and writes (adds) result rows [r0, r1) to out rows
// row_offset + i, times factor[i - r0] when given; with fold_n > 0 row i is y[i] + y[i + fold_n].
// Without folding, reading v and writing out are fused into the first and last transform passes.
// Returns true when v held a non-finite value (read as 0).
template <bool Accumulate, class TV, class TO>
bool convolve_unit(const kernels::fft_plan& plan, float* work, const float* spec, const tensor_view<TV, 4>& v,
                   const tensor_view<TO, 4>& out, index_t b, index_t h, const block_pair& bp, index_t rows, index_t r0,
                   index_t r1, index_t fold_n, const float* factor, index_t row_offset) {
  const index_t M = plan.size();
  value_reader<TV> rd(v, b, h, bp, rows);
  auto mul = [spec](index_t pos0, index_t n, float* elems) { multiply_spectrum(spec, pos0, n, elems); };
  if (fold_n > 0) {
    for (index_t m = 0; m < M; ++m) rd(m, work + m * E);
    kernels::fft_convolve(plan, work, mul);
    unpack_rows<Accumulate>(work, M, r0, r1, fold_n, factor, out, b, h, bp, row_offset);
  } else {
    const row_writer<Accumulate, TO> wr(out, b, h, bp);
    kernels::fft_convolve(
        plan, work, rd, mul,
        [&](index_t m, const float* src) {
          if (m < r0 || m >= r1) return;
          vec re = simd::load(src), im = simd::load(src + W);
          if (factor) {
            const vec f(factor[m - r0]);
            re *= f;
            im *= f;
          }
          wr(row_offset + m, re, im);
        },
        rows);
  }
  return rd.saw_nonfinite();
}

// The same for `count` consecutive block pairs of one head at once (first_blk, first_blk + 1, ...),
// without folding: one pass over the rows of v reads each row's count * 2 * simd::width channels as
// one contiguous run, which matters once v is out of cache (its rows are H * D elements apart). work
// holds count transforms of plan.padded_size() elements. bad[k] is set when block pair k held a
// non-finite value (read as 0).
template <class TV, class TO>
void convolve_head_units(const kernels::fft_plan& plan, float* work, const float* spec, const tensor_view<TV, 4>& v,
                         const tensor_view<TO, 4>& out, index_t b, index_t h, index_t first_blk, index_t count,
                         index_t rows, index_t r0, index_t r1, const float* factor, std::vector<char>& bad) {
  const index_t D = v.extent(3), stride = plan.padded_size() * E;
  std::vector<value_reader<TV>> rd;
  std::vector<row_writer<false, TO>> wr;
  rd.reserve(static_cast<std::size_t>(count));
  wr.reserve(static_cast<std::size_t>(count));
  // The first pair's reader and writer prefetch the whole run of channels of a row, the others
  // nothing: a prefetch per pair asks again for the line two pairs share when the rows are not
  // 64-byte aligned, and those repeats made packing v ~1.5x slower in isolation (Zen 3, N 64k,
  // D 64; the whole operator did not change measurably).
  const auto run = std::size_t(std::min(D, (first_blk + count) * 2 * W) - first_blk * 2 * W);
  for (index_t k = 0; k < count; ++k) {
    const block_pair bp = make_block_pair(D, first_blk + k);
    rd.emplace_back(v, b, h, bp, rows);
    wr.emplace_back(out, b, h, bp);
    rd.back().set_prefetch_bytes(k > 0 ? 0 : run * sizeof(TV));
    wr.back().set_prefetch_bytes(k > 0 ? 0 : run * sizeof(TO));
  }
  const bool skip_zeros = plan.fused(0);
  kernels::detail::for_each_padded(plan, [&](index_t m, index_t at) {
    for (index_t k = 0; k < count; ++k) {
      float* dst = work + k * stride + at * E;
      if (m < rows) rd[static_cast<std::size_t>(k)](m, dst);
      else if (!skip_zeros) std::fill(dst, dst + E, 0.f);
    }
  });
  auto mul = [spec](index_t pos0, index_t n, float* elems) { multiply_spectrum(spec, pos0, n, elems); };
  for (index_t k = 0; k < count; ++k) kernels::detail::convolve_from(plan, 0, work + k * stride, 0, mul, true, rows);
  kernels::detail::for_each_padded(plan, [&](index_t m, index_t at) {
    if (m < r0 || m >= r1) return;
    const vec f(factor ? factor[m - r0] : 1.f);
    for (index_t k = 0; k < count; ++k) {
      const float* src = work + k * stride + at * E;
      vec re = simd::load(src), im = simd::load(src + W);
      if (factor) {
        re *= f;
        im *= f;
      }
      wr[static_cast<std::size_t>(k)](m, re, im);
    }
  });
  bad.resize(static_cast<std::size_t>(count));
  for (index_t k = 0; k < count; ++k) bad[static_cast<std::size_t>(k)] = rd[static_cast<std::size_t>(k)].saw_nonfinite();
}

#ifndef ATTNKIT_CAT_UNIT_BYTES
#define ATTNKIT_CAT_UNIT_BYTES (index_t(32) << 20)
#endif
// Block pairs per work unit of the group convolution: all of a head's, as long as their transforms
// fit unit_scratch_bytes per thread (at least one).
inline constexpr index_t unit_scratch_bytes = ATTNKIT_CAT_UNIT_BYTES;
inline index_t pairs_per_unit(const kernels::fft_plan& plan, index_t blocks) {
  const index_t bytes = plan.padded_size() * E * static_cast<index_t>(sizeof(float));
  return std::clamp<index_t>(unit_scratch_bytes / bytes, 1, blocks);
}

// Per-head results of the softmax phase.
struct head_info {
  index_t top_begin = 0;   // the group convolution writes rows [top_begin, N)
  index_t solve_rows = 0;  // renormalize: solve() writes rows [0, solve_rows)
  bool poison_tail = false;  // renormalize: rows [solve_rows, N) are NaN (a NaN or +inf logit)
};

// Softmax of one head's logits (as float in l[0..N)) into lane `lane` of buf, scaled by `scale`.
// For renormalize also the per-row factor 1 / (prefix mass) of the accepted rows.
inline head_info softmax_lane(const float* l, index_t N, bool causal_renorm, float scale, float* w,
                              float* row_factor, std::vector<float>& e, std::vector<double>& cum) {
  head_info info;
  const float inf = std::numeric_limits<float>::infinity();
  index_t first_bad = N;
  for (index_t j = 0; j < N; ++j)
    if (std::isnan(l[j]) || l[j] == inf) {
      first_bad = j;
      break;
    }
  const float G = first_bad < N ? inf : simd::max_of(l, N);
  if (causal_renorm) {
    info.top_begin = N;
    if (first_bad < N || G == -inf) {
      // A NaN / +inf logit: rows from it on are NaN, solve() gives the others. All -inf: every
      // row's prefix is -inf and solve() leaves zeros. The group convolution is unused.
      info.solve_rows = first_bad;
      info.poison_tail = first_bad < N;
      std::fill(w, w + N, 0.f);
      return info;
    }
  } else if (first_bad < N || G == -inf) {
    std::fill(w, w + N, first_bad < N ? std::numeric_limits<float>::quiet_NaN() : 0.f);
    return info;
  }
  e.resize(static_cast<std::size_t>(N));
  const vec g(G);
  index_t j = 0;
  for (; j + W <= N; j += W) simd::store(e.data() + j, simd::exp(simd::load(l + j) - g));
  if (j < N) simd::store_tail(e.data() + j, simd::exp(simd::load_tail(l + j, N - j) - g), N - j);
  double sum = 0;
  for (index_t m = 0; m < N; ++m) sum += e[m];
  const float ws = static_cast<float>(static_cast<double>(scale) / sum);
  for (index_t m = 0; m < N; ++m) w[m] = e[m] * ws;
  if (causal_renorm) {
    cum.resize(static_cast<std::size_t>(N));
    double c = 0;
    for (index_t m = 0; m < N; ++m) cum[m] = c += e[m];
    index_t i0 = 0;
    while (i0 < N && cum[i0] < renorm_tau * sum) ++i0;
    info.top_begin = i0;
    info.solve_rows = i0;
    for (index_t i = i0; i < N; ++i) row_factor[i] = static_cast<float>(sum / cum[i]);
  }
  return info;
}

// Fills a channel-pair buffer of M elements with nf <= W real filters (filter f, of length n, at
// w + f * ldw, in lane f of the real parts; zeros elsewhere), in one sequential pass.
inline void fill_filters(float* buf, index_t M, const float* w, index_t ldw, index_t nf, index_t n) {
  alignas(64) float tmp[W];
  for (index_t j = 0; j < M; ++j) {
    if (j < n) {
      for (index_t f = 0; f < W; ++f) tmp[f] = f < nf ? w[f * ldw + j] : 0.f;
      simd::store(buf + j * E, vec::load_aligned(tmp));
    } else {
      simd::store(buf + j * E, vec(0.f));
    }
    simd::store(buf + j * E + W, vec(0.f));
  }
}

// After the forward transform of fill_filters' buffer: filter f's spectrum as interleaved complex
// scalars spec[f * 2M + 2 pos], spec[f * 2M + 2 pos + 1], in one sequential pass.
inline void extract_spectra(const float* buf, index_t M, index_t nf, float* spec) {
  alignas(64) float re[W], im[W];
  for (index_t pos = 0; pos < M; ++pos) {
    simd::load(buf + pos * E).store_aligned(re);
    simd::load(buf + pos * E + W).store_aligned(im);
    for (index_t f = 0; f < nf; ++f) {
      spec[f * 2 * M + 2 * pos] = re[f];
      spec[f * 2 * M + 2 * pos + 1] = im[f];
    }
  }
}

// causal + renormalize, rows [0, rows) of one head (see the top of the file).
template <class TV, class TO>
class renorm_solver {
 public:
  renorm_solver(const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out, index_t b, index_t h, const float* l,
                index_t rows)
      : v_(v), out_(out), b_(b), h_(h), l_(l), rows_(rows), D_(v.extent(3)) {
    // Prefix maximum P_i and 1 / sum_{m <= i} exp(l_m - P_i), in double.
    P_.resize(static_cast<std::size_t>(rows));
    invd_.resize(static_cast<std::size_t>(rows));
    double m = -std::numeric_limits<double>::infinity(), s = 0;
    for (index_t i = 0; i < rows; ++i) {
      const double x = l[i];
      if (x > m) {
        s = s * std::exp(m - x) + 1.0;
        m = x;
      } else if (x > -std::numeric_limits<double>::infinity()) {
        s += std::exp(x - m);
      }
      P_[i] = static_cast<float>(m);
      invd_[i] = m == -std::numeric_limits<double>::infinity() ? 0.0 : 1.0 / s;
    }
  }

  void run() {
    const index_t blocks = (D_ + 2 * W - 1) / (2 * W);
    // Zero the rows, then every piece adds its part.
    for (index_t i = 0; i < rows_; ++i)
      for (index_t d = 0; d < D_; ++d) out_(b_, i, h_, d) = TO(0);
    bad_.assign(static_cast<std::size_t>(blocks), false);
    if (rows_ > 0) solve(0, rows_);
    // A non-finite value poisons the rows from its position on, except rows whose prefix is all
    // -inf (output 0 by definition). It reaches rows through lags of weight 0 too (0 * NaN): when a
    // piece without weight was skipped, its values were not read, so v is scanned.
    index_t first_weighted = 0;
    while (first_weighted < rows_ && P_[first_weighted] == -std::numeric_limits<float>::infinity()) ++first_weighted;
    for (index_t blk = 0; blk < blocks; ++blk) {
      const block_pair bp = make_block_pair(D_, blk);
      if (bad_[static_cast<std::size_t>(blk)] || skipped_)
        poison_rows(v_, out_, b_, h_, bp, rows_, false, first_weighted, rows_);
    }
  }

 private:
  // Rows o + i' (i' < L) receive lags o + m' (m' <= i') with values v[i' - m'].
  void solve(index_t o, index_t L) {
    if (L <= renorm_direct) return direct(o, L);
    float A = -std::numeric_limits<float>::infinity();
    for (index_t m = 0; m < L; ++m) A = std::max(A, l_[o + m]);
    if (A == -std::numeric_limits<float>::infinity()) {  // no weight at all
      skipped_ = true;
      return;
    }
    std::vector<double> cum(static_cast<std::size_t>(L));
    double c = 0;
    for (index_t m = 0; m < L; ++m) cum[m] = c += std::exp(static_cast<double>(l_[o + m]) - A);
    index_t i0 = 0;
    while (cum[i0] < renorm_tau * c) ++i0;
    if (i0 <= L / 2) {
      // Causal piece: lags [o, o + L), values [0, L), rows [i0, L); linear convolution.
      piece(o, L, L, kernels::fft_good_size(2 * L - 1), A, i0, L);
      if (i0 > 0) solve(o, i0);
    } else {
      const index_t half = L / 2;
      // Lags [o, o + half) for rows [half, L): values [0, L), cyclic length >= L has no wrap there.
      piece(o, half, L, kernels::fft_good_size(L), A_of(o, half), half, L);
      solve(o, half);
      solve(o + half, L - half);
    }
  }

  float A_of(index_t o, index_t n) const {
    float A = -std::numeric_limits<float>::infinity();
    for (index_t m = 0; m < n; ++m) A = std::max(A, l_[o + m]);
    return A;
  }

  // Adds to rows o + i (i in [r0, r1)) the convolution of lags a[m] = exp(l[o + m] - A), m < nlags,
  // with values v[0..nvals), through a cyclic transform of length M, times exp(A - P) / d per row.
  void piece(index_t o, index_t nlags, index_t nvals, index_t M, float A, index_t r0, index_t r1) {
    if (A == -std::numeric_limits<float>::infinity() || r1 <= r0) {
      skipped_ = true;
      return;
    }
    auto plan = kernels::get_fft_plan(M);
    float* buf = kernels::fft_thread_scratch(slot_work, plan->padded_size() * E);
    const float inv_m = 1.f / static_cast<float>(M);
    lags_.resize(static_cast<std::size_t>(nlags));
    for (index_t m = 0; m < nlags; ++m) lags_[m] = std::exp(l_[o + m] - A) * inv_m;
    fill_filters(buf, M, lags_.data(), nlags, 1, nlags);
    kernels::fft_forward(*plan, buf);
    float* spec = kernels::fft_thread_scratch(slot_piece, 2 * M);
    extract_spectra(buf, M, 1, spec);
    factor_.resize(static_cast<std::size_t>(r1 - r0));
    for (index_t i = r0; i < r1; ++i) {
      const float P = P_[o + i];
      factor_[i - r0] = P == -std::numeric_limits<float>::infinity() ? 0.f
                                                                     : static_cast<float>(std::exp(A - P) * invd_[o + i]);
    }
    const index_t blocks = (D_ + 2 * W - 1) / (2 * W);
    for (index_t blk = 0; blk < blocks; ++blk) {
      const block_pair bp = make_block_pair(D_, blk);
      if (convolve_unit<true>(*plan, buf, spec, v_, out_, b_, h_, bp, nvals, r0, r1, 0, factor_.data(), o))
        bad_[static_cast<std::size_t>(blk)] = true;
    }
  }

  void direct(index_t o, index_t L) {
    const index_t blocks = (D_ + 2 * W - 1) / (2 * W);
    coef_.assign(static_cast<std::size_t>(L * L), 0.f);
    for (index_t i = 0; i < L; ++i) {
      const float P = P_[o + i];
      if (P == -std::numeric_limits<float>::infinity()) continue;
      for (index_t m = 0; m <= i; ++m)
        coef_[i * L + m] = static_cast<float>(std::exp(static_cast<double>(l_[o + m]) - P) * invd_[o + i]);
    }
    vals_.resize(static_cast<std::size_t>(L * E));
    for (index_t blk = 0; blk < blocks; ++blk) {
      const block_pair bp = make_block_pair(D_, blk);
      if (pack_values(v_, b_, h_, bp, L, L, vals_.data())) bad_[static_cast<std::size_t>(blk)] = true;
      acc_.assign(static_cast<std::size_t>(L * E), 0.f);
      for (index_t i = 0; i < L; ++i) {
        vec re(0.f), im(0.f);
        for (index_t m = 0; m <= i; ++m) {
          const vec c(coef_[i * L + m]);
          re = simd::fma(c, simd::load(vals_.data() + (i - m) * E), re);
          im = simd::fma(c, simd::load(vals_.data() + (i - m) * E + W), im);
        }
        simd::store(acc_.data() + i * E, re);
        simd::store(acc_.data() + i * E + W, im);
      }
      unpack_rows<true>(acc_.data(), L, 0, L, 0, nullptr, out_, b_, h_, bp, o);
    }
  }

  tensor_view<TV, 4> v_;
  tensor_view<TO, 4> out_;
  index_t b_, h_;
  const float* l_;
  index_t rows_, D_;
  std::vector<float> P_;
  std::vector<double> invd_;
  std::vector<float> factor_, coef_, vals_, acc_, lags_;
  std::vector<bool> bad_;
  bool skipped_ = false;  // a piece or subproblem returned without reading its values
};

template <class TL>
void gather_logits(const tensor_view<TL, 3>& logits, index_t b, index_t h, index_t N, float* l) {
  const TL* p = logits.data() + b * logits.stride(0) + h * logits.stride(1);
  const index_t st = logits.stride(2);
  for (index_t j = 0; j < N; ++j) l[j] = convert<float>(p[j * st]);
}

}  // namespace detail::cat

// CAT in O(N log N) per head and channel. logits: logical (batch, head, seq); v and out: logical
// (batch, seq, head, dim). Any strides and element types (see the top of the file).
template <class TL, class TV, class TO>
void circular_attention(tensor_view<TL, 3> logits, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                        const circular_params& p = {}) {
  namespace cat = detail::cat;
  using cat::E;
  using cat::W;
  detail::check_circular_types<TL, TV, TO>();
  const auto s = detail::validate_circular("circular_attention", logits, v, out);
  const index_t N = s.seq, D = s.dim, BH = s.batch * s.heads;
  if (N == 0 || D == 0 || BH == 0) return;
  const bool renorm = p.causal && p.renormalize;
  const bool direct_cyclic = !p.causal && kernels::fft_is_good_size(N);
  const index_t M = direct_cyclic ? N : kernels::fft_good_size(2 * N - 1);
  const index_t fold = !p.causal && !direct_cyclic ? N : 0;
  const auto plan = kernels::get_fft_plan(M);
  const index_t blocks = (D + 2 * W - 1) / (2 * W);
  const index_t per_unit = cat::pairs_per_unit(*plan, blocks), units_per_head = (blocks + per_unit - 1) / per_unit;

  std::vector<float> l(static_cast<std::size_t>(N)), e;
  std::vector<double> cum;
  std::vector<cat::head_info> info(static_cast<std::size_t>(W));
  for (index_t g0 = 0; g0 < BH; g0 += W) {
    const index_t nh = std::min(W, BH - g0);
    // Softmax of each head into its lane, one forward transform for the group, spectra extracted.
    float* group = kernels::fft_thread_scratch(cat::slot_group, nh * (2 * M + N + (renorm ? N : 0)));
    float* spectra = group;
    float* weights = group + nh * 2 * M;
    float* factors = weights + nh * N;
    for (index_t lane = 0; lane < nh; ++lane) {
      const index_t b = (g0 + lane) / s.heads, h = (g0 + lane) % s.heads;
      cat::gather_logits(logits, b, h, N, l.data());
      info[lane] = cat::softmax_lane(l.data(), N, renorm, 1.f / static_cast<float>(M), weights + lane * N,
                                     renorm ? factors + lane * N : nullptr, e, cum);
    }
    float* buf = kernels::fft_thread_scratch(cat::slot_work, plan->padded_size() * E);
    cat::fill_filters(buf, M, weights, N, nh, N);
    kernels::fft_forward(*plan, buf);
    cat::extract_spectra(buf, M, nh, spectra);

    // The convolutions, one unit per (head, channel block pair).
    parallel_for(nh * units_per_head, 1, [&](index_t u0, index_t u1) {
      float* work = kernels::fft_thread_scratch(cat::slot_work, per_unit * plan->padded_size() * E);
      std::vector<char> bad;
      for (index_t u = u0; u < u1; ++u) {
        const index_t lane = u / units_per_head, blk0 = (u % units_per_head) * per_unit;
        const index_t count = std::min(per_unit, blocks - blk0);
        const auto& hi = info[lane];
        if (hi.top_begin >= N) continue;
        const index_t b = (g0 + lane) / s.heads, h = (g0 + lane) % s.heads;
        const float* f = renorm ? factors + lane * N + hi.top_begin : nullptr;
        if (fold > 0) {
          bad.assign(static_cast<std::size_t>(count), 0);
          for (index_t k = 0; k < count; ++k)
            bad[static_cast<std::size_t>(k)] =
                cat::convolve_unit<false>(*plan, work, spectra + lane * 2 * M, v, out, b, h,
                                          cat::make_block_pair(D, blk0 + k), N, hi.top_begin, N, fold, f, 0);
        } else {
          cat::convolve_head_units(*plan, work, spectra + lane * 2 * M, v, out, b, h, blk0, count, N, hi.top_begin, N,
                                   f, bad);
        }
        for (index_t k = 0; k < count; ++k)
          if (bad[static_cast<std::size_t>(k)])
            cat::poison_rows(v, out, b, h, cat::make_block_pair(D, blk0 + k), N, !p.causal, hi.top_begin, N);
      }
    });

    if (!renorm) continue;
    // causal + renormalize: the rows the group convolution could not give accurately, per head.
    parallel_for(nh, 1, [&](index_t h0, index_t h1) {
      std::vector<float> lh(static_cast<std::size_t>(N));
      for (index_t lane = h0; lane < h1; ++lane) {
        const auto& hi = info[lane];
        const index_t b = (g0 + lane) / s.heads, h = (g0 + lane) % s.heads;
        if (hi.poison_tail)
          for (index_t i = hi.solve_rows; i < N; ++i)
            for (index_t d = 0; d < D; ++d) out(b, i, h, d) = std::numeric_limits<TO>::quiet_NaN();
        if (hi.solve_rows == 0) continue;
        cat::gather_logits(logits, b, h, hi.solve_rows, lh.data());
        cat::renorm_solver<TV, TO> solver(v, out, b, h, lh.data(), hi.solve_rows);
        solver.run();
      }
    });
  }
}

// ---- CAT's averaged-key logits ---------------------------------------------------------------------

// logits[b, h, i] = scale * q[b, i, h, :] . kbar[b, h / (Hq / Hkv), :] with kbar the mean of k over
// the sequence; scale 0 means 1 / sqrt(head_dim). The mean is accumulated in double, the dot products
// in float (double for double q).
template <class TQ, class TK, class TL>
void averaged_key_logits(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TL, 3> logits, float scale = 0.f) {
  static_assert(is_input_element_v<std::remove_const_t<TQ>> && is_input_element_v<std::remove_const_t<TK>>,
                "q and k elements must be float, double, attnkit::bf16 or attnkit::f16");
  static_assert(is_output_element_v<TL>, "logits elements must be (non-const) float or double");
  constexpr std::string_view fn = "averaged_key_logits";
  const index_t B = q.extent(0), Nq = q.extent(1), Hq = q.extent(2), D = q.extent(3);
  const index_t Nk = k.extent(1), Hkv = k.extent(2);
  detail::require(k.extent(0) == B, fn, "k", detail::text("batch extent ", B, " (as q)"), k.extent(0));
  detail::require(k.extent(3) == D, fn, "k", detail::text("head_dim ", D, " (as q)"), k.extent(3));
  detail::require(Hq == 0 || Hkv >= 1, fn, "k", "at least one kv head", Hkv);
  detail::require(Hkv == 0 || Hq % Hkv == 0, fn, "k",
                  detail::text("a kv head count dividing the query head count ", Hq), Hkv);
  detail::require_extents(fn, "logits", logits, {B, Hq, Nq}, "(batch, head, seq)");
  detail::require_writable(fn, "logits", logits);
  detail::require(std::isfinite(scale), fn, "scale", "a finite value (0 for 1/sqrt(head_dim))", scale);
  detail::require(Nk >= 1 || B * Hq * Nq == 0, fn, "k", "at least one key (the mean of no keys is undefined)", Nk);
  if (B * Hq * Nq == 0) return;
  using A = accum_t<TQ>;
  const A sc = detail::effective_scale<A>(scale, D);
  const index_t group = Hq / Hkv;
  std::vector<A> kbar(static_cast<std::size_t>(B * Hkv * D));
  parallel_for(B * Hkv, 1, [&](index_t u0, index_t u1) {
    std::vector<double> acc(static_cast<std::size_t>(D));
    for (index_t u = u0; u < u1; ++u) {
      const index_t b = u / Hkv, hk = u % Hkv;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (index_t j = 0; j < Nk; ++j)
        for (index_t d = 0; d < D; ++d) acc[d] += convert<double>(k(b, j, hk, d));
      for (index_t d = 0; d < D; ++d) kbar[u * D + d] = static_cast<A>(acc[d] / static_cast<double>(Nk));
    }
  });
  parallel_for(B * Nq, 64, [&](index_t r0, index_t r1) {
    std::vector<A> row(static_cast<std::size_t>(D));
    for (index_t r = r0; r < r1; ++r) {
      const index_t b = r / Nq, i = r % Nq;
      for (index_t h = 0; h < Hq; ++h) {
        const A* kb = kbar.data() + (b * Hkv + h / group) * D;
        A dot = 0;
        if constexpr (std::is_same_v<A, float>) {
          if (q.stride(3) == 1) {
            simd::convert_row(row.data(), &q(b, i, h, 0), D);
            dot = simd::dot(row.data(), kb, D);
          } else {
            for (index_t d = 0; d < D; ++d) dot += convert<float>(q(b, i, h, d)) * kb[d];
          }
        } else {
          for (index_t d = 0; d < D; ++d) dot += convert<A>(q(b, i, h, d)) * kb[d];
        }
        logits(b, h, i) = static_cast<TL>(sc * dot);
      }
    }
  });
}

}  // namespace attnkit
