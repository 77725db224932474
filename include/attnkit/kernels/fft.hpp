// Batched FFTs along the sequence axis, vectorized across channels: one SIMD lane is one channel,
// so a transform never gathers along a channel. This is the engine behind circular_attention (CAT)
// and is usable on its own (rfft / irfft below, FFTW's r2c / c2r batch layout).
//
// Data layout ("channel-pair buffer"). A buffer holds n complex elements; element k is two SIMD
// vectors stored back to back, fft_elem = 2 * simd::width floats:
//     buf[k * fft_elem + 0 .. W)  = real parts of W lanes,  buf[k * fft_elem + W .. 2W) = imaginary parts.
// Real signals are processed two channel blocks at a time (block A in the real parts, block B in
// the imaginary parts: z = a + i b). For a convolution with a real filter this is exact with no
// extra work (conv(w, a + i b) = conv(w, a) + i conv(w, b)); rfft separates the two spectra by
// Hermitian symmetry.
//
// Algorithm. Mixed-radix (2, 3, 4, 5) in-place decimation in frequency (Gentleman-Sande) for the
// forward transform, whose output is in digit-reversed ("scrambled") order, and the mirror-image
// decimation in time for the inverse, whose input is scrambled and output natural. A convolution
// therefore needs no reordering at all: forward, multiply by a filter spectrum computed by the same
// forward transform (hence in the same scrambled order), inverse. Lengths are 2^a 3^b 5^c
// (fft_good_size gives the next one). Callers that need an exact cyclic convolution of another
// length N use a zero-padded length M >= 2N - 1 (the linear convolution, truncated or folded back
// modulo N), which is what circular_attention does: two transforms of length M per convolution,
// where Bluestein's chirp-z would need two such transforms per DFT of length N, four per convolution.
//
// Cache blocking. A sub-array larger than fft_block_bytes gets one fused pass of two stages (each
// element read and written once for both) and its radix_a * radix_b contiguous sub-arrays recurse;
// a sub-array that fits is finished stage by stage inside the cache. fft_convolve goes further: for
// each in-cache block it runs the remaining forward stages, the pointwise product and the first
// inverse stages before moving on, so the spectrum never makes a round trip to memory. The elements
// a fused pass touches together are a power of two apart for power-of-two lengths, i.e. in one cache
// set; the plan's padded layout (a cache line after each chunk) spreads them, and is what
// fft_convolve with load/store callbacks and rfft/irfft use internally.
//
// Twiddles are computed once per plan in double precision and stored in float; plans are cached per
// length (thread-safe). Arithmetic is float; the result of every transform depends only on the
// length and the data (no thread-count or timing dependence).
#pragma once

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <numbers>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/core/types.hpp"
#include "attnkit/kernels/scratch.hpp"
#include "attnkit/simd/simd.hpp"

namespace attnkit::kernels {

// Floats per complex element of a channel-pair buffer (two vectors: real and imaginary lanes).
inline constexpr index_t fft_elem = 2 * simd::width;
// Sub-arrays up to this many bytes are finished stage by stage, in cache; larger ones are split by
// fused two-stage passes first. Half of a 1 MiB L2; override with -DATTNKIT_FFT_BLOCK_BYTES=...
// (measured on the Zen 5 bench machine: 256 KiB to 1 MiB within noise, 32 KiB 5-10% slower at 64k).
#ifndef ATTNKIT_FFT_BLOCK_BYTES
#define ATTNKIT_FFT_BLOCK_BYTES (512 * 1024)
#endif
inline constexpr index_t fft_block_bytes = ATTNKIT_FFT_BLOCK_BYTES;
// Unused elements after each chunk of a fused pass in the padded layout (at least one cache line).
#ifndef ATTNKIT_FFT_PAD_ELEMS
#define ATTNKIT_FFT_PAD_ELEMS std::max<index_t>(1, 64 / (fft_elem * static_cast<index_t>(sizeof(float))))
#endif
inline constexpr index_t fft_pad_elems = ATTNKIT_FFT_PAD_ELEMS;

// True when n >= 1 is a product of 2, 3 and 5 (the lengths fft_plan supports).
inline bool fft_is_good_size(index_t n) {
  if (n < 1) return false;
  for (index_t p : {2, 3, 5})
    while (n % p == 0) n /= p;
  return n == 1;
}

// The smallest 2^a 3^b 5^c >= n (1 for n <= 1).
inline index_t fft_good_size(index_t n) {
  if (n <= 1) return 1;
  index_t best = 1;
  while (best < n) best *= 2;  // a power of two always qualifies
  for (index_t p5 = 1; p5 < best; p5 *= 5)
    for (index_t p35 = p5; p35 < best; p35 *= 3) {
      index_t m = p35;
      while (m < n) m *= 2;
      best = std::min(best, m);
    }
  return best;
}

// One pass of a mixed-radix transform: sub-arrays of length `len` are split by `radix` into
// sub-arrays of length q = len / radix. tw holds, for p in [0, q) and k in [1, radix), the twiddle
// exp(-2 pi i k p / len) as (re, im) at tw[2 * ((radix - 1) * p + k - 1)].
struct fft_stage {
  int radix = 0;
  index_t len = 0, q = 0;
  std::vector<float> tw;
};

class fft_plan {
 public:
  explicit fft_plan(index_t n) : n_(n) {
    attnkit::detail::require(fft_is_good_size(n), "fft_plan", "n", "a length 2^a 3^b 5^c >= 1", n);
    // Radices from the outermost stage in: 5s and 3s first (few of them), then 4s, a lone 2 last
    // (its pass has q = 1: no twiddles).
    std::vector<int> radices;
    index_t m = n;
    for (int r : {5, 3}) while (m % r == 0) { radices.push_back(r); m /= r; }
    while (m % 4 == 0) { radices.push_back(4); m /= 4; }
    if (m == 2) radices.push_back(2);
    index_t len = n;
    for (int r : radices) {
      fft_stage s;
      s.radix = r;
      s.len = len;
      s.q = len / r;
      s.tw.resize(static_cast<std::size_t>(2 * (r - 1) * s.q));
      for (index_t p = 0; p < s.q; ++p)
        for (int k = 1; k < r; ++k) {
          const double a = -2.0 * std::numbers::pi * static_cast<double>((k * p) % len) / static_cast<double>(len);
          const auto at = static_cast<std::size_t>(2 * ((r - 1) * p + k - 1));
          s.tw[at] = static_cast<float>(std::cos(a));
          s.tw[at + 1] = static_cast<float>(std::sin(a));
        }
      stages_.push_back(std::move(s));
      len /= r;
    }
    // The padded layout: a stage-s sub-array longer than the block size is split by a fused pass into
    // radix_s * radix_{s+1} chunks; each chunk is followed by fft_pad_elems unused elements so the
    // chunks do not start at power-of-two distances (which map every element a fused pass touches
    // to the same cache set).
    const std::size_t S = stages_.size();
    fused_.assign(S + 1, false);
    size_.assign(S + 2, 1);
    for (std::size_t t = S; t-- > 0;) {
      const auto& st = stages_[t];
      fused_[t] = t + 1 < S && st.len * fft_elem * static_cast<index_t>(sizeof(float)) > fft_block_bytes;
      size_[t] = fused_[t] ? st.radix * stages_[t + 1].radix * (size_[t + 2] + fft_pad_elems) : st.len;
    }
  }
  fft_plan(const fft_plan&) = delete;
  fft_plan& operator=(const fft_plan&) = delete;

  index_t size() const { return n_; }
  const std::vector<fft_stage>& stages() const { return stages_; }

  // Whether a sub-array of stage s is split by a fused two-stage pass (else it is finished in cache).
  bool fused(std::size_t s) const { return s < stages_.size() && fused_[s]; }
  // Elements a stage-s sub-array occupies in the padded layout (padded_size() = the whole transform).
  index_t padded_size(std::size_t s = 0) const { return size_[std::min(s, stages_.size())]; }
  // Distance between the chunks a fused stage-s pass produces, in the padded layout.
  index_t chunk_stride(std::size_t s) const { return size_[s + 2] + fft_pad_elems; }
  // Where element i (natural index before the forward transform, scrambled position after it) of a
  // stage-s sub-array lives in the padded layout.
  index_t padded_address(index_t i, std::size_t s = 0) const {
    index_t off = 0;
    while (fused(s)) {
      const index_t chunk_len = s + 2 < stages_.size() ? stages_[s + 2].len : 1;
      off += (i / chunk_len) * chunk_stride(s);
      i %= chunk_len;
      s += 2;
    }
    return off + i;
  }

  // The scrambled position at which the forward transform leaves frequency k (table built on first use).
  index_t position_of(index_t k) const {
    build_position_tables();
    return pos_[static_cast<std::size_t>(k)];
  }
  // padded_address(position_of(k)), from a table.
  index_t padded_position_of(index_t k) const {
    build_position_tables();
    return padded_pos_[static_cast<std::size_t>(k)];
  }

 private:
  void build_position_tables() const {
    std::call_once(pos_once_, [this] {
      pos_.resize(static_cast<std::size_t>(n_));
      padded_pos_.resize(static_cast<std::size_t>(n_));
      for (index_t pos = 0; pos < n_; ++pos) {
        index_t rem = pos, f = 0, mult = 1;
        for (const auto& s : stages_) {
          f += (rem / s.q) * mult;
          rem %= s.q;
          mult *= s.radix;
        }
        pos_[static_cast<std::size_t>(f)] = pos;
        padded_pos_[static_cast<std::size_t>(f)] = padded_address(pos);
      }
    });
  }

  index_t n_;
  std::vector<fft_stage> stages_;
  std::vector<char> fused_;
  std::vector<index_t> size_;
  mutable std::once_flag pos_once_;
  mutable std::vector<index_t> pos_, padded_pos_;
};

// The plan for length n, built once per length and shared (safe to call from any thread). The cache
// keeps every length it has seen; fft_clear_plan_cache() drops plans no caller still holds.
inline std::shared_ptr<const fft_plan> get_fft_plan(index_t n);
inline void fft_clear_plan_cache();

namespace detail {
struct fft_plan_cache {
  std::mutex mu;
  std::map<index_t, std::shared_ptr<const fft_plan>> plans;
};
inline fft_plan_cache& plan_cache() {
  static fft_plan_cache c;
  return c;
}
}  // namespace detail

inline std::shared_ptr<const fft_plan> get_fft_plan(index_t n) {
  auto& c = detail::plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto& slot = c.plans[n];
  if (!slot) slot = std::make_shared<const fft_plan>(n);
  return slot;
}

inline void fft_clear_plan_cache() {
  auto& c = detail::plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.plans.clear();
}

// ---- per-thread scratch ----------------------------------------------------------------------------

// The transforms' scratch: a set of grow-only, 64-byte aligned buffers per thread (an element is
// whole vectors), reused across calls so that large transforms do not page-fault their scratch in
// on every call. Separate from thread_scratch's slots, because fft_release_thread_scratch() frees
// them: a long transform's buffers are the ones worth giving back. Slot numbers are a convention
// between the callers (circular_attention uses 0..2).
inline constexpr int fft_scratch_slots = 4;

inline scratch_buffer* fft_scratch_buffers() {
  thread_local scratch_buffer bufs[fft_scratch_slots];
  return bufs;
}

// At least n floats of the calling thread's scratch slot `slot` (contents unspecified).
inline float* fft_thread_scratch(int slot, index_t n) {
  return static_cast<float*>(fft_scratch_buffers()[slot].get(static_cast<std::size_t>(n) * sizeof(float)));
}

// Frees the calling thread's scratch (the next call that needs it allocates again).
inline void fft_release_thread_scratch() {
  for (int s = 0; s < fft_scratch_slots; ++s) fft_scratch_buffers()[s].release();
}

// ---- butterflies on complex vectors -------------------------------------------------------------------

namespace detail {

using simd::vec;
inline constexpr index_t W = simd::width;

struct cvec {
  vec re, im;
};

inline cvec ldc(const float* p) { return {simd::load(p), simd::load(p + W)}; }
inline void stc(float* p, const cvec& x) {
  simd::store(p, x.re);
  simd::store(p + W, x.im);
}
inline cvec operator+(const cvec& a, const cvec& b) { return {a.re + b.re, a.im + b.im}; }
inline cvec operator-(const cvec& a, const cvec& b) { return {a.re - b.re, a.im - b.im}; }
inline cvec scaled(const cvec& a, float s) {
  const vec v(s);
  return {a.re * v, a.im * v};
}
// a * (wr + i wi), the scalar broadcast to every lane.
inline cvec cmul(const cvec& a, float wr, float wi) {
  const vec r(wr), i(wi);
  return {xsimd::fms(a.re, r, a.im * i), xsimd::fma(a.re, i, a.im * r)};
}
// -i * a (forward rotation) or +i * a (inverse).
template <bool Fwd>
inline cvec rot(const cvec& a) {
  if constexpr (Fwd) return {a.im, -a.re};
  else return {-a.im, a.re};
}

// Radix-r butterfly: y_k = sum_s x_s exp(-+2 pi i k s / r) (sign - forward, + inverse), in place in x[].
template <int R, bool Fwd>
inline void butterfly(cvec* x) {
  if constexpr (R == 2) {
    const cvec a = x[0], b = x[1];
    x[0] = a + b;
    x[1] = a - b;
  } else if constexpr (R == 3) {
    constexpr float h = 0.866025403784438646763723170752936183f;  // sqrt(3) / 2
    const cvec t1 = x[1] + x[2];
    const cvec t2 = x[0] - scaled(t1, 0.5f);
    const cvec t3 = rot<Fwd>(scaled(x[1] - x[2], h));
    x[0] = x[0] + t1;
    x[1] = t2 + t3;
    x[2] = t2 - t3;
  } else if constexpr (R == 4) {
    const cvec t0 = x[0] + x[2], t1 = x[0] - x[2], t2 = x[1] + x[3];
    const cvec t3 = rot<Fwd>(x[1] - x[3]);
    x[0] = t0 + t2;
    x[1] = t1 + t3;
    x[2] = t0 - t2;
    x[3] = t1 - t3;
  } else if constexpr (R == 5) {
    constexpr float c1 = 0.309016994374947424102293417182819059f;   // cos(2 pi / 5)
    constexpr float c2 = -0.809016994374947424102293417182819059f;  // cos(4 pi / 5)
    constexpr float s1 = 0.951056516295153572116439333379382143f;   // sin(2 pi / 5)
    constexpr float s2 = 0.587785252292473129168705954639072769f;   // sin(4 pi / 5)
    const cvec t1 = x[1] + x[4], t2 = x[2] + x[3], t3 = x[1] - x[4], t4 = x[2] - x[3];
    const cvec a1 = x[0] + scaled(t1, c1) + scaled(t2, c2);
    const cvec a2 = x[0] + scaled(t1, c2) + scaled(t2, c1);
    const cvec b1 = rot<Fwd>(scaled(t3, s1) + scaled(t4, s2));
    const cvec b2 = rot<Fwd>(scaled(t3, s2) - scaled(t4, s1));
    x[0] = x[0] + t1 + t2;
    x[1] = a1 + b1;
    x[4] = a1 - b1;
    x[2] = a2 + b2;
    x[3] = a2 - b2;
  }
}

// One radix-R butterfly of a stage at index p: inputs in + k * in_stride, outputs out + k * out_stride
// (k < R, strides in elements; in == out for in place). Forward (DIF): butterfly, then multiply
// output k by tw(k, p). Inverse (DIT): multiply input k by conj(tw(k, p)), then the inverse butterfly.
// The inverse undoes the forward one up to a factor R.
// Forced inline (also butterfly_at): GCC 12 kept the radix-4 butterflies out of line in the stage
// loops (a call per butterfly, in every pass of every transform; with -march=skylake-avx512 also
// butterfly_at<3, 4, 5>, with znver3 butterfly_at<5>); inlined, CAT at N 8k D 128 on 2 threads took
// 12.2 instead of 20.3 ms on Zen 3 (fastest of 10 alternated repetitions).
template <int R, bool Fwd>
[[gnu::always_inline]] inline void butterfly_io(const float* in, index_t in_stride, float* out, index_t out_stride,
                                                index_t p, const float* tw, index_t nonzero = R) {
  cvec y[R];
  for (int k = 0; k < R; ++k) y[k] = k < nonzero ? ldc(in + k * in_stride * fft_elem) : cvec{vec(0.f), vec(0.f)};
  const float* t = tw + 2 * (R - 1) * p;
  if constexpr (!Fwd) {
    if (p > 0)
      for (int k = 1; k < R; ++k) y[k] = cmul(y[k], t[2 * (k - 1)], -t[2 * (k - 1) + 1]);
  }
  butterfly<R, Fwd>(y);
  if constexpr (Fwd) {
    if (p > 0)
      for (int k = 1; k < R; ++k) y[k] = cmul(y[k], t[2 * (k - 1)], t[2 * (k - 1) + 1]);
  }
  for (int k = 0; k < R; ++k) stc(out + k * out_stride * fft_elem, y[k]);
}

template <int R, bool Fwd>
[[gnu::always_inline]] inline void butterfly_at(float* x, index_t stride, index_t p, const float* tw) {
  butterfly_io<R, Fwd>(x, stride, x, stride, p, tw);
}

// One stage over `count` consecutive sub-arrays of length s.len starting at base.
template <int R, bool Fwd>
inline void stage_pass(const fft_stage& s, float* base, index_t count) {
  for (index_t c = 0; c < count; ++c) {
    float* x0 = base + c * s.len * fft_elem;
    for (index_t p = 0; p < s.q; ++p) butterfly_at<R, Fwd>(x0 + p * fft_elem, s.q, p, s.tw.data());
  }
}

template <bool Fwd>
inline void run_stage(const fft_stage& s, float* base, index_t count) {
  switch (s.radix) {
    case 2: return stage_pass<2, Fwd>(s, base, count);
    case 3: return stage_pass<3, Fwd>(s, base, count);
    case 4: return stage_pass<4, Fwd>(s, base, count);
    case 5: return stage_pass<5, Fwd>(s, base, count);
    default: return;
  }
}

// Two consecutive stages a (length a.len) and b (length b.len = a.q) in one pass over the array at
// base: for each p < b.q the a.radix * b.radix elements p + k2 * b.q + k1 * a.q are read from memory
// by the first stage's butterflies, which leave their results in a small L1 tile, and written back
// by the second stage's. Memory is read and written once for both stages: out-of-cache levels use
// this pass.
// Element p + k2 * b.q + k1 * a.q lives at (k1 * R2 + k2) * chunk + inner(p): chunk = b.q and
// inner(p) = p for a contiguous array; for the padded layout chunk = plan->chunk_stride(s) and
// inner(p) = plan->padded_address(p, s + 2) (given by inner_plan, nullptr for the identity).
// Forward only: elements with index >= nonzero are known to be zero and are not read (their
// storage may hold anything); the results are the same bits as with stored zeros.
template <bool Fwd, int R1, int R2>
inline void fused_pass(const fft_stage& a, const fft_stage& b, float* base, index_t chunk, const fft_plan* inner_plan,
                       std::size_t inner_stage, index_t nonzero) {
  const index_t q2 = b.q, q1 = R2 * chunk;
  alignas(64) float tile[R1 * R2 * fft_elem];  // tile[k1 * R2 + k2]
  for (index_t p = 0; p < q2; ++p) {
    float* col = base + (inner_plan ? inner_plan->padded_address(p, inner_stage) : p) * fft_elem;
    if constexpr (Fwd) {
      for (int k2 = 0; k2 < R2; ++k2) {
        // Element (k1, k2) has index p + k2 * q2 + k1 * a.q: the first (nonzero - ...) / a.q are read.
        const index_t first = p + k2 * q2;
        const index_t nz = first >= nonzero ? 0 : std::min<index_t>(R1, (nonzero - first + a.q - 1) / a.q);
        butterfly_io<R1, true>(col + k2 * chunk * fft_elem, q1, tile + k2 * fft_elem, R2, p + k2 * q2, a.tw.data(), nz);
      }
      for (int k1 = 0; k1 < R1; ++k1)
        butterfly_io<R2, true>(tile + k1 * R2 * fft_elem, 1, col + k1 * q1 * fft_elem, chunk, p, b.tw.data());
    } else {
      for (int k1 = 0; k1 < R1; ++k1)
        butterfly_io<R2, false>(col + k1 * q1 * fft_elem, chunk, tile + k1 * R2 * fft_elem, 1, p, b.tw.data());
      for (int k2 = 0; k2 < R2; ++k2)
        butterfly_io<R1, false>(tile + k2 * fft_elem, R2, col + k2 * chunk * fft_elem, q1, p + k2 * q2, a.tw.data());
    }
  }
}

template <bool Fwd, int R1>
inline void fused_pass_r2(const fft_stage& a, const fft_stage& b, float* base, index_t chunk, const fft_plan* ip,
                          std::size_t is, index_t nz) {
  switch (b.radix) {
    case 2: return fused_pass<Fwd, R1, 2>(a, b, base, chunk, ip, is, nz);
    case 3: return fused_pass<Fwd, R1, 3>(a, b, base, chunk, ip, is, nz);
    case 4: return fused_pass<Fwd, R1, 4>(a, b, base, chunk, ip, is, nz);
    case 5: return fused_pass<Fwd, R1, 5>(a, b, base, chunk, ip, is, nz);
    default: return;
  }
}

template <bool Fwd>
inline void fused_pass(const fft_stage& a, const fft_stage& b, float* base, index_t chunk = 0,
                       const fft_plan* inner_plan = nullptr, std::size_t inner_stage = 0, index_t nonzero = -1) {
  if (chunk == 0) chunk = b.q;
  if (nonzero < 0) nonzero = a.len;
  switch (a.radix) {
    case 2: return fused_pass_r2<Fwd, 2>(a, b, base, chunk, inner_plan, inner_stage, nonzero);
    case 3: return fused_pass_r2<Fwd, 3>(a, b, base, chunk, inner_plan, inner_stage, nonzero);
    case 4: return fused_pass_r2<Fwd, 4>(a, b, base, chunk, inner_plan, inner_stage, nonzero);
    case 5: return fused_pass_r2<Fwd, 5>(a, b, base, chunk, inner_plan, inner_stage, nonzero);
    default: return;
  }
}

// The fused pass of stage s of plan p on the sub-array at base, contiguous or padded layout.
template <bool Fwd>
inline void plan_fused_pass(const fft_plan& p, std::size_t s, float* base, bool padded, index_t nonzero = -1) {
  const auto& st = p.stages();
  if (padded) fused_pass<Fwd>(st[s], st[s + 1], base, p.chunk_stride(s), p.fused(s + 2) ? &p : nullptr, s + 2, nonzero);
  else fused_pass<Fwd>(st[s], st[s + 1], base, 0, nullptr, 0, nonzero);
}

inline index_t chunk_distance(const fft_plan& p, std::size_t s, bool padded) {
  return padded ? p.chunk_stride(s) : p.stages()[s + 1].q;
}

inline index_t stage_len(const fft_plan& p, std::size_t s) {
  return s < p.stages().size() ? p.stages()[s].len : 1;
}

// Stages s.. of the forward transform on one sub-array (length stage_len(p, s)) at base. A sub-array
// the plan marks fused gets one fused two-stage pass and its radix_s * radix_{s+1} chunks recurse;
// the others are finished stage by stage (breadth first, in cache). `padded`: the padded layout.
inline void forward_from(const fft_plan& p, std::size_t s, float* base, bool padded) {
  const auto& st = p.stages();
  if (s >= st.size()) return;
  if (!p.fused(s)) {
    for (std::size_t t = s; t < st.size(); ++t) run_stage<true>(st[t], base, st[s].len / st[t].len);
    return;
  }
  plan_fused_pass<true>(p, s, base, padded);
  const index_t step = chunk_distance(p, s, padded);
  for (index_t j = 0; j < st[s].radix * st[s + 1].radix; ++j) forward_from(p, s + 2, base + j * step * fft_elem, padded);
}

inline void inverse_from(const fft_plan& p, std::size_t s, float* base, bool padded) {
  const auto& st = p.stages();
  if (s >= st.size()) return;
  if (!p.fused(s)) {
    for (std::size_t t = st.size(); t-- > s;) run_stage<false>(st[t], base, st[s].len / st[t].len);
    return;
  }
  const index_t step = chunk_distance(p, s, padded);
  for (index_t j = 0; j < st[s].radix * st[s + 1].radix; ++j) inverse_from(p, s + 2, base + j * step * fft_elem, padded);
  plan_fused_pass<false>(p, s, base, padded);
}

// nonzero: elements >= nonzero of this sub-array are zero (only used when it starts with a fused pass).
template <class F>
inline void convolve_from(const fft_plan& p, std::size_t s, float* base, index_t pos0, F& pointwise, bool padded,
                          index_t nonzero = -1) {
  const auto& st = p.stages();
  if (!p.fused(s)) {
    forward_from(p, s, base, padded);
    pointwise(pos0, stage_len(p, s), base);
    inverse_from(p, s, base, padded);
    return;
  }
  plan_fused_pass<true>(p, s, base, padded, nonzero);
  const index_t step = chunk_distance(p, s, padded), sub = stage_len(p, s + 2);
  for (index_t j = 0; j < st[s].radix * st[s + 1].radix; ++j)
    convolve_from(p, s + 2, base + j * step * fft_elem, pos0 + j * sub, pointwise, padded);
  plan_fused_pass<false>(p, s, base, padded);
}

// Calls f(i, address) for i = 0, 1, ..., n - 1 with address = p.padded_address(i), without divisions.
template <class F>
inline void for_each_padded(const fft_plan& p, std::size_t s, index_t base, index_t& i, F& f) {
  if (!p.fused(s)) {
    for (index_t k = 0; k < stage_len(p, s); ++k) f(i++, base + k);
    return;
  }
  const auto& st = p.stages();
  for (index_t j = 0; j < st[s].radix * st[s + 1].radix; ++j) for_each_padded(p, s + 2, base + j * p.chunk_stride(s), i, f);
}

template <class F>
inline void for_each_padded(const fft_plan& p, F&& f) {
  index_t i = 0;
  for_each_padded(p, 0, 0, i, f);
}

}  // namespace detail

// ---- transforms on channel-pair buffers ----------------------------------------------------------------

// In place, buf holds plan.size() elements in natural order; afterwards buf[pos] holds the unnormalized
// DFT X[k] = sum_m x[m] exp(-2 pi i k m / n) at pos = plan.position_of(k).
inline void fft_forward(const fft_plan& plan, float* buf) { detail::forward_from(plan, 0, buf, false); }

// In place, from scrambled order (as fft_forward leaves it) to natural order; unnormalized
// (fft_inverse(fft_forward(x)) = n * x).
inline void fft_inverse(const fft_plan& plan, float* buf) { detail::inverse_from(plan, 0, buf, false); }

// fft_forward, then pointwise(pos0, count, elems) on consecutive runs of scrambled positions
// [pos0, pos0 + count) whose elements start at elems, then fft_inverse. The runs cover [0, n) once
// each, in increasing order, while they are in cache. With pointwise multiplying by the scrambled
// spectrum of a filter, the result is n times the circular convolution of the buffer with the filter.
template <class F>
inline void fft_convolve(const fft_plan& plan, float* buf, F&& pointwise) {
  detail::convolve_from(plan, 0, buf, 0, pointwise, false);
}

// fft_convolve for data that does not live in a channel-pair buffer, in the plan's padded layout
// (faster once the transform is larger than the cache: see fft_plan). buf holds plan.padded_size()
// elements of scratch. load(m, dst) writes element m (natural order, 2 * simd::width floats) to dst;
// then the convolution runs; then store(m, src) receives element m of the result (n times the
// convolution). Both run over m = 0, 1, ..., n - 1 in order. Loading and storing are separate
// sequential passes on purpose: reading strided sources inside the first transform pass (25
// interleaved streams) measured slower than streaming them once, and so did loading a block of
// 32 butterfly columns at a time just before the first pass transforms it (CAT N 64k, Zen 3).
//
// nonzero (default n): the input elements m >= nonzero are zero; load is not called for them and,
// when the transform starts with a fused pass, they are neither written nor read (zero-padded
// convolutions skip half their input traffic).
template <class Load, class F, class Store>
inline void fft_convolve(const fft_plan& plan, float* buf, Load&& load, F&& pointwise, Store&& store,
                         index_t nonzero = -1) {
  const index_t n = plan.size();
  nonzero = nonzero < 0 ? n : std::min(nonzero, n);
  const bool skip_zeros = plan.fused(0);
  detail::for_each_padded(plan, [&](index_t m, index_t at) {
    if (m < nonzero) load(m, buf + at * fft_elem);
    else if (!skip_zeros) std::fill(buf + at * fft_elem, buf + (at + 1) * fft_elem, 0.f);
  });
  detail::convolve_from(plan, 0, buf, 0, pointwise, true, nonzero);
  detail::for_each_padded(plan, [&](index_t m, index_t at) { store(m, static_cast<const float*>(buf + at * fft_elem)); });
}

// ---- real transforms in FFTW's batch layout --------------------------------------------------------

namespace detail {

// Loads lanes [c, c + n) of row x (contiguous floats), zero beyond n.
inline vec load_lanes(const float* x, index_t n) {
  return n >= W ? simd::load(x) : simd::load_tail(x, std::max<index_t>(n, 0));
}

using cbatch = xsimd::batch<std::complex<float>, simd::arch>;

// GCC 12 reports -Warray-bounds inside the full-vector branches below when a caller's channel count
// is a small constant (the branch is unreachable then: n < W); the accesses are in bounds.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Warray-bounds"
#endif

// Stores lanes [0, n) of re + i im as interleaved std::complex<float> (FFTW's fftwf_complex layout).
inline void store_complex_lanes(std::complex<float>* X, const vec& re, const vec& im, index_t n) {
  if (n >= W) {
    cbatch(re, im).store_unaligned(X);
    return;
  }
  alignas(64) float r[W], i[W];
  re.store_aligned(r);
  im.store_aligned(i);
  for (index_t c = 0; c < n; ++c) X[c] = {r[c], i[c]};
}

// Loads lanes [0, n) of interleaved complex values into (re, im), zero beyond n; with real_only the
// imaginary parts read as 0.
inline void load_complex_lanes(const std::complex<float>* X, index_t n, bool real_only, vec& re, vec& im) {
  if (n >= W) {
    const cbatch z = cbatch::load_unaligned(X);
    re = z.real();
    im = real_only ? vec(0.f) : z.imag();
    return;
  }
  alignas(64) float r[W], i[W];
  for (index_t c = 0; c < W; ++c) {
    r[c] = c < n ? X[c].real() : 0.f;
    i[c] = c < n && !real_only ? X[c].imag() : 0.f;
  }
  re = vec::load_aligned(r);
  im = vec::load_aligned(i);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace detail

// Forward real transforms of `channels` signals of length n = plan.size(), stored x[m * ldx + c]
// (m < n, c < channels), into X[k * ldX + c] = sum_m x[m * ldx + c] exp(-2 pi i k m / n) for
// k <= n / 2: FFTW's fftwf_plan_many_dft_r2c layout with istride = ostride = 1 per channel and the
// channel as the contiguous dimension. Scratch: plan.padded_size() * fft_elem floats (nullptr: the
// calling thread's).
inline void rfft(const fft_plan& plan, const float* x, index_t ldx, index_t channels, std::complex<float>* X,
                 index_t ldX, float* scratch = nullptr) {
  using detail::W;
  const index_t n = plan.size(), half = n / 2;
  float* buf = scratch ? scratch : fft_thread_scratch(0, plan.padded_size() * fft_elem);
  for (index_t c0 = 0; c0 < channels; c0 += 2 * W) {
    const index_t na = std::min(W, channels - c0), nb = std::min(W, channels - c0 - W);
    detail::for_each_padded(plan, [&](index_t m, index_t at) {
      const float* row = x + m * ldx + c0;
      simd::store(buf + at * fft_elem, detail::load_lanes(row, na));
      simd::store(buf + at * fft_elem + W, nb > 0 ? detail::load_lanes(row + W, nb) : detail::vec(0.f));
    });
    detail::forward_from(plan, 0, buf, true);
    // z = a + i b with a, b real: A[k] = (Z[k] + conj Z[n-k]) / 2, B[k] = (Z[k] - conj Z[n-k]) / (2i).
    const detail::vec half_v(0.5f);
    for (index_t k = 0; k <= half; ++k) {
      const float* zk = buf + plan.padded_position_of(k) * fft_elem;
      const float* zm = buf + plan.padded_position_of(k == 0 ? 0 : n - k) * fft_elem;
      const detail::vec zr = simd::load(zk), zi = simd::load(zk + W), yr = simd::load(zm), yi = simd::load(zm + W);
      std::complex<float>* row = X + k * ldX + c0;
      detail::store_complex_lanes(row, (zr + yr) * half_v, (zi - yi) * half_v, na);
      if (nb > 0) detail::store_complex_lanes(row + W, (zi + yi) * half_v, (yr - zr) * half_v, nb);
    }
  }
}

// Inverse of rfft (same scratch), normalized: x[m * ldx + c] = (1/n) sum_k X_c[k] exp(2 pi i k m / n) over the full
// Hermitian spectrum built from X[k * ldX + c], k <= n / 2 (the imaginary parts of X[0] and, for even
// n, X[n/2] are ignored, as in FFTW's c2r).
inline void irfft(const fft_plan& plan, const std::complex<float>* X, index_t ldX, index_t channels, float* x,
                  index_t ldx, float* scratch = nullptr) {
  using detail::W;
  const index_t n = plan.size(), half = n / 2;
  float* buf = scratch ? scratch : fft_thread_scratch(0, plan.padded_size() * fft_elem);
  const float inv_n = 1.f / static_cast<float>(n);
  for (index_t c0 = 0; c0 < channels; c0 += 2 * W) {
    const index_t na = std::min(W, channels - c0), nb = std::min(W, channels - c0 - W);
    for (index_t k = 0; k <= half; ++k) {
      const std::complex<float>* row = X + k * ldX + c0;
      const bool real_only = k == 0 || 2 * k == n;
      detail::vec Ar, Ai, Br(0.f), Bi(0.f);
      detail::load_complex_lanes(row, na, real_only, Ar, Ai);
      if (nb > 0) detail::load_complex_lanes(row + W, nb, real_only, Br, Bi);
      // Z[k] = A[k] + i B[k]; Z[n-k] = conj(A[k]) + i conj(B[k]).
      float* zk = buf + plan.padded_position_of(k) * fft_elem;
      simd::store(zk, Ar - Bi);
      simd::store(zk + W, Ai + Br);
      if (k != 0 && 2 * k != n) {
        float* zm = buf + plan.padded_position_of(n - k) * fft_elem;
        simd::store(zm, Ar + Bi);
        simd::store(zm + W, Br - Ai);
      }
    }
    detail::inverse_from(plan, 0, buf, true);
    const detail::vec s(inv_n);
    detail::for_each_padded(plan, [&](index_t m, index_t at) {
      float* row = x + m * ldx + c0;
      const detail::vec re = simd::load(buf + at * fft_elem) * s, im = simd::load(buf + at * fft_elem + W) * s;
      if (na >= W) simd::store(row, re);
      else simd::store_tail(row, re, na);
      if (nb >= W) simd::store(row + W, im);
      else if (nb > 0) simd::store_tail(row + W, im, nb);
    });
  }
}

}  // namespace attnkit::kernels
