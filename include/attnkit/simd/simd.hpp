// The SIMD layer: the only place that names an instruction set. Everything above it works with
// attnkit::simd::vec (an xsimd batch of float for the compile-time target) and these helpers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <xsimd/xsimd.hpp>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include "attnkit/core/types.hpp"

namespace attnkit::simd {

using arch = xsimd::default_arch;
using vec = xsimd::batch<float, arch>;
using dvec = xsimd::batch<double, arch>;
inline constexpr index_t width = static_cast<index_t>(vec::size);

inline const char* arch_name() { return arch::name(); }

// ---- loads with conversion to float ------------------------------------------------------------

inline vec load(const float* p) { return vec::load_unaligned(p); }

// With AVX-512 xsimd's default batch holds 16 floats, with AVX2 (and without AVX-512) 8.
inline vec load(const bf16* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
#elif defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
#else
  alignas(64) float tmp[width];
  for (index_t i = 0; i < width; ++i) tmp[i] = static_cast<float>(p[i]);
  return vec::load_aligned(tmp);
#endif
}

inline vec load(const f16* p) {
#if defined(__AVX512F__)
  return vec(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__AVX2__) && defined(__F16C__)
  return vec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  alignas(64) float tmp[width];
  for (index_t i = 0; i < width; ++i) tmp[i] = static_cast<float>(p[i]);
  return vec::load_aligned(tmp);
#endif
}

inline vec load(const double* p) {
  alignas(64) float tmp[width];
  for (index_t i = 0; i < width; ++i) tmp[i] = static_cast<float>(p[i]);
  return vec::load_aligned(tmp);
}

// Loads n (0 <= n <= width) elements and fills the remaining lanes with `fill`.
template <class T>
inline vec load_tail(const T* p, index_t n, float fill = 0.f) {
  alignas(64) float tmp[width];
  for (index_t i = 0; i < width; ++i) tmp[i] = i < n ? convert<float>(p[i]) : fill;
  return vec::load_aligned(tmp);
}

inline void store(float* p, const vec& x) { x.store_unaligned(p); }

inline void store_tail(float* p, const vec& x, index_t n) {
  alignas(64) float tmp[width];
  x.store_aligned(tmp);
  for (index_t i = 0; i < n; ++i) p[i] = tmp[i];
}

// Hints the hardware to bring every cache line [p, p + bytes) touches into the caches ahead of use
// (Locality as for __builtin_prefetch: 3 = all levels, 2 = L2 and below; Write = 1 when the lines
// will be written). The lines are counted from p's own line: a range that does not start on a line
// boundary (a std::vector of a few MiB starts 16 bytes into a page) spans one line more than
// bytes / 64 suggests.
// Always inlined: out of line, GCC may treat the helper as side-effect free and drop its calls
// (also when it is inlined into a helper that is not: mark such callers always_inline too).
template <int Locality = 3, int Write = 0>
[[gnu::always_inline]] inline void prefetch(const void* p, std::size_t bytes) {
  if (bytes == 0) return;
  const std::uintptr_t first = reinterpret_cast<std::uintptr_t>(p) & ~std::uintptr_t(63);
  const std::uintptr_t end = reinterpret_cast<std::uintptr_t>(p) + bytes;
  for (std::uintptr_t a = first; a < end; a += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a), Write, Locality);
}

// Returns x in a register the compiler cannot trace back to memory. Where registers are short (16
// with AVX2), GCC and clang fold a loaded vector that is reused by several FMAs back into each FMA
// as a memory operand, so a 4 x 3 GEMM block issued 16 loads per 12 FMAs instead of 7 and ran at
// half speed (Zen 3: 34 vs 69 GFLOP/s per core on flash's Q K^T tile). An empty asm the compiler
// must assume rewrites the value stops the folding; it emits no instruction. By value: applied to
// an array element in place, GCC also kept the array in memory and stored every pinned vector to
// the stack (2 dead stores per 8 FMAs in dot_rows).
[[gnu::always_inline]] inline vec in_register(vec x) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  asm("" : "+v"(x.data));
#endif
  return x;
}

// Fully unrolls the loop that follows: the loops that fill and store a register block's
// accumulators. GCC otherwise unrolls them only after deciding where the accumulator array lives,
// and kept gemm_block's and accumulate_rows_block's in memory: every accumulator stored and
// reloaded before and after the k loop (AVX2 and AVX-512 alike). Not under nvcc, whose front end
// does not know the pragma (host code there only serves the CUDA tests' references).
#if defined(__GNUC__) && !defined(__CUDACC__)
#define ATTNKIT_UNROLL _Pragma("GCC unroll 64")
#else
#define ATTNKIT_UNROLL
#endif

// ---- arithmetic ---------------------------------------------------------------------------------

inline vec fma(const vec& a, const vec& b, const vec& c) { return xsimd::fma(a, b, c); }

// exp with exp(-inf) = 0 and exp(x > 88.72) = +inf, accurate to a few ulp (xsimd's implementation).
inline vec exp(const vec& x) { return xsimd::exp(x); }

// exp with the same contract as simd::exp (exp(-inf) exactly 0, +inf above 88.72, NaN stays NaN,
// results below the smallest normal float rounded to subnormals or 0), within 2 ulp, for
// throughput-bound elementwise maps (linear attention's elu + 1; in the online-softmax update it
// made no measurable difference on the Intel dev machine). AVX-512: round to the nearest multiple of ln 2,
// Cephes' degree-5 polynomial of the remainder (split ln 2 for an exact reduction) and one vscalefps
// for 2^n, which also produces the overflow, underflow and subnormal results; about a third of the
// instructions of xsimd's exp. Elsewhere xsimd's exp.
inline vec exp_fast(const vec& x) {
#if defined(__AVX512F__)
  // max/min return their second operand when one is NaN, so NaN lanes pass through unchanged.
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return vec(_mm512_scalef_ps(p, n));
#else
  return xsimd::exp(x);
#endif
}

inline float hsum(const vec& x) { return xsimd::hadd(x); }

// Transposing reduction: lane j of the result is the sum of the lanes of rows[j], j < width.
// xsimd 8.1's haddp permutes lanes 2..5 and 10..13 of its AVX-512 result, so AVX-512 has its own
// (unpack/add, then 128-bit lane shuffles); other targets use xsimd's, checked by test_simd.
inline vec hsum_rows(const vec* rows) {
#if defined(__AVX512F__)
  __m512 t[8];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = rows[2 * i], b = rows[2 * i + 1];
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  __m512 u[4];  // u[k], 128-bit lane L, element e: sum of rows[4k + e] over lane L
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(t[2 * k]), b = _mm512_castps_pd(t[2 * k + 1]);
    u[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return vec(_mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD)));
#else
  return xsimd::haddp(rows);
#endif
}

// In-place transpose of the width x width block held in rows[0..width): lane j of rows[i] becomes
// lane i of rows[j]. AVX-512: log2(16) rounds of a perfect shuffle (rows i and i + 8 interleaved
// into rows 2i and 2i + 1), each a two-source permute; AVX: the usual unpack, shuffle and 128-bit
// lane swap rounds (24 instructions instead of 64 scalar loads and stores); elsewhere through memory.
inline void transpose(vec* rows) {
#if defined(__AVX512F__)
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int round = 0; round < 4; ++round) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_permutex2var_ps(rows[i], lo, rows[i + 8]);
      t[2 * i + 1] = _mm512_permutex2var_ps(rows[i], hi, rows[i + 8]);
    }
    for (int i = 0; i < 16; ++i) rows[i] = vec(t[i]);
  }
#elif defined(__AVX__)
  static_assert(width == 8);
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {  // t[2i], t[2i + 1]: rows 2i and 2i + 1 interleaved, per 128-bit half
    t[2 * i] = _mm256_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
  }
  for (int g = 0; g < 2; ++g) {  // u[4g + c]: lane c of rows 4g..4g + 3, then lane c + 4 of them
    u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    rows[c] = vec(_mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
    rows[c + 4] = vec(_mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
  }
#else
  alignas(64) float t[width * width];
  for (index_t i = 0; i < width; ++i) rows[i].store_aligned(t + i * width);
  for (index_t i = 0; i < width; ++i) {
    alignas(64) float c[width];
    for (index_t j = 0; j < width; ++j) c[j] = t[j * width + i];
    rows[i] = vec::load_aligned(c);
  }
#endif
}

inline float hmax(const vec& x) {
  alignas(64) float tmp[width];
  x.store_aligned(tmp);
  float m = tmp[0];
  for (index_t i = 1; i < width; ++i) m = tmp[i] > m ? tmp[i] : m;
  return m;
}

// ---- bf16 pair dot products (AVX-512 BF16) --------------------------------------------------------
// A 32-bit lane holds two bf16 values (elements d, d + 1 of a row). dot_bf16_pairs adds, per lane,
// a0 * b0 + a1 * b1 to acc in float (products exact, one rounding per addition), with `a` one pair
// broadcast to every lane and `b` a vector of pairs. Only where the target has the instructions.
#if defined(__AVX512BF16__) && defined(__AVX512F__)
inline constexpr bool has_bf16_dot = true;
inline vec dot_bf16_pairs(const vec& acc, std::uint32_t a, const std::uint32_t* b) {
  const __m512i bv = _mm512_loadu_si512(static_cast<const void*>(b));
  return vec(_mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(a)), (__m512bh)bv));
}
#else
inline constexpr bool has_bf16_dot = false;
#endif

// Whether softmax operators form bf16 Q K^T with dot_bf16_pairs rather than on converted float
// tiles. Not where the target also has AVX512-FP16 (Intel Sapphire Rapids and later), whose
// VDPBF16PS issues at half the rate of float FMAs: on the Intel dev machine the float path ran bf16
// flash prefill 1.25x faster (N 2048, D 128, 2 threads), while on Zen 5 the pair path is faster.
#if defined(__AVX512FP16__)
inline constexpr bool prefer_bf16_dot = false;
#else
inline constexpr bool prefer_bf16_dot = has_bf16_dot;
#endif

// ---- whole-array helpers (any length; vector body, masked tail) ---------------------------------

// dst[i] = float(src[i]) for i < n.
template <class T>
inline void convert_row(float* dst, const T* src, index_t n) {
  index_t i = 0;
  for (; i + width <= n; i += width) store(dst + i, load(src + i));
  if (i < n) store_tail(dst + i, load_tail(src + i, n - i), n - i);
}

// Dot product of two float arrays of length n.
inline float dot(const float* a, const float* b, index_t n) {
  vec acc(0.f);
  index_t i = 0;
  for (; i + width <= n; i += width) acc = fma(load(a + i), load(b + i), acc);
  if (i < n) acc = fma(load_tail(a + i, n - i), load_tail(b + i, n - i), acc);
  return hsum(acc);
}

// y[i] += a * x[i] for i < n.
inline void axpy(float* y, float a, const float* x, index_t n) {
  const vec va(a);
  index_t i = 0;
  for (; i + width <= n; i += width) store(y + i, fma(va, load(x + i), load(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// x[i] *= a for i < n.
inline void scale(float* x, float a, index_t n) {
  const vec va(a);
  index_t i = 0;
  for (; i + width <= n; i += width) store(x + i, va * load(x + i));
  for (; i < n; ++i) x[i] *= a;
}

// Maximum of n floats (-inf for n == 0).
inline float max_of(const float* x, index_t n) {
  vec m(-std::numeric_limits<float>::infinity());
  index_t i = 0;
  for (; i + width <= n; i += width) m = xsimd::max(m, load(x + i));
  float r = hmax(m);
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

}  // namespace attnkit::simd
