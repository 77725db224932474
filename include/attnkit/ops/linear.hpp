// Linear (kernelized) attention: feature maps, Performer FAVOR+ random features, the causal chunked
// form with per-head decay, and recurrent decoding.
//
// Definition. For a feature map phi, query head h (kv head hk = h / (Hq / Hkv)), query i and key j:
//
//   w_ij = phi(q_i) . phi(k_j) * gamma_h^(i - j)
//
// where gamma_h is the per-head decay (params.decay; absent = 1, only with causal). The keys in play
// are all j < Nk (non-causal) or j <= i (causal, Nq == Nk). With params.normalize (default)
//   out_i = sum_j w_ij v_j / (sum_j w_ij + eps)      (a row whose denominator is exactly 0 gets 0)
// and without it out_i = sum_j w_ij v_j.
//
// Feature maps (d = head_dim, all applied per row):
//   identity        phi(x) = x
//   elu_plus_one    phi(x) = elu(x) + 1 = (x > 0 ? x + 1 : exp(x))        (Katharopoulos et al. 2020)
//   relu            phi(x) = max(x, 0)                                      (NaN stays NaN)
//   cosine          phi(x) = x / |x|_2  (0 for x = 0)                      (Cottention; usually normalize = false)
//   favor_positive  phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),  x' = x * sqrt(scale)
//                   with W the m x d params.projection, so that E[phi(q).phi(k)] = exp(scale * q.k)
//                   (Performer FAVOR+, Choromanski et al. 2021). scale = 0 means 1/sqrt(d).
//
// FAVOR+ stabilization. As in Performer, the fast paths evaluate exp(u - M) instead of exp(u), with
// M the per-row maximum for a query and one maximum over the keys for the keys (a running maximum
// over the keys read so far, rescaling the accumulated state when it grows, so the chunked, causal
// and recurrent forms never see a key twice). Unlike Performer, the stabilizers are then undone
// exactly: eps is compared with the stabilized denominator as eps * exp(-(M_q + M_k)), and the
// unnormalized output is multiplied by exp(M_q + M_k). The result is therefore the definition above,
// independent of the stabilizers, and the recurrent steps agree with the parallel pass.
//
// Algorithms (accumulation in float, in double when an input or the state is double):
//   non-causal  S = phi(K)^T V and z = sum_j phi(k_j) per (batch, kv head), then out = phi(Q) S / phi(Q) z,
//               both GEMM-shaped (kernels::gemm_acc), in blocks of 64 keys / queries.
//   causal      fixed chunks of C = 32 positions. Per chunk: P_c = phi(Q_c) phi(K_c)^T (GEMM, only
//               the columns up to each row block's diagonal), masked to j <= i and decayed by
//               gamma^(i-j); then [gamma^(i+1) phi(Q_c) | P_c] x [S; V_c] as one GEMM per row block
//               for the part left of the block's diagonal, and the diagonal triangle by a small
//               register kernel, so masked entries are never read (a NaN in v_j reaches only rows
//               i >= j); then S <- gamma^C S + sum_j gamma^(C-1-j) phi(k_j) v_j^T (GEMM) and z. Every
//               decay exponent lies within a chunk (0 .. C): no gamma^(-i) growth on long sequences.
//               With grouped heads, the query heads of a kv head with equal decay (and equal initial
//               state) share one state: phi(K), V and the state update are computed once per chunk for
//               all of them, each query head adding only its own P_c and output GEMMs. A task walks a
//               group (split when there are fewer tasks than threads), or 2 query heads without GQA,
//               chunk by chunk (adjacent heads share cache lines in the usual (batch, seq, head, dim)
//               layout), and prefetches rows two chunks ahead, a few rows between GEMM blocks.
//   recurrent   linear_attention_step appends one token to a linear_attention_state:
//               S <- gamma S + phi(k) v^T, z <- gamma z + phi(k), out = phi(q) S / (phi(q) z + eps),
//               in one pass over the state (which serves up to 4 query heads of a state per kv head).
// Work is parallel over (batch, group or pair of query heads) (causal), (batch, kv head) and then
// (batch, query head, 1024 query rows) (non-causal), or (batch, state head) (decode); each head is computed
// the same way whatever the thread count and whether its state is shared, so results are bitwise
// identical for any number of threads. Scratch is per task: O(C (F + C) + F Dv) floats per state,
// plus F Dv per (batch, kv head) for the non-causal S. Known cost: query heads of one kv head with different
// decays keep separate states (phi(K) recomputed for each, and a state per query head when decoding).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numbers>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <Eigen/Core>
#include <Eigen/QR>

#include "attnkit/core/attention_params.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/parallel.hpp"
#include "attnkit/core/tensor_view.hpp"
#include "attnkit/core/types.hpp"
#include "attnkit/kernels/gemm.hpp"
#include "attnkit/kernels/linear_math.hpp"
#include "attnkit/simd/simd.hpp"

namespace attnkit {

enum class feature_map { identity, elu_plus_one, relu, cosine, favor_positive };

inline const char* feature_map_name(feature_map f) {
  switch (f) {
    case feature_map::identity: return "identity";
    case feature_map::elu_plus_one: return "elu_plus_one";
    case feature_map::relu: return "relu";
    case feature_map::cosine: return "cosine";
    case feature_map::favor_positive: return "favor_positive";
  }
  return "unknown";
}

struct linear_params {
  feature_map phi = feature_map::elu_plus_one;
  bool causal = false;
  bool normalize = true;
  float eps = 1e-6f;
  const float* decay = nullptr;              // one gamma per query head in (0, 1], causal only
  tensor_view<const float, 2> projection{};  // favor_positive: m x d random feature matrix (logical (feature, dim))
  float scale = 0.f;                         // favor_positive approximates exp(scale * q.k); 0 -> 1/sqrt(d)
};

// The feature dimension phi produces for head_dim d: m (projection rows) for favor_positive, else d.
inline index_t linear_feature_dim(const linear_params& p, index_t head_dim) {
  return p.phi == feature_map::favor_positive ? p.projection.extent(0) : head_dim;
}

// ---- FAVOR+ random features -----------------------------------------------------------------------

// An owning m x d row-major matrix. It converts to the view linear_params::projection takes; the
// conversion is deleted for temporaries so a params struct cannot keep a dangling view.
struct favor_projection {
  index_t features = 0, dim = 0;
  std::vector<float> values;  // [features][dim]

  tensor_view<const float, 2> view() const& { return matrix(values.data(), features, dim); }
  tensor_view<const float, 2> view() const&& = delete;
  operator tensor_view<const float, 2>() const& { return view(); }  // NOLINT(google-explicit-constructor)
  operator tensor_view<const float, 2>() const&& = delete;
};

namespace detail {

// Standard normal samples from mt19937_64 by Box-Muller: the engine is fully specified by the
// standard (std::normal_distribution is not), so a seed gives the same matrix with every library.
class normal_source {
 public:
  explicit normal_source(std::uint64_t seed) : gen_(seed) {}
  double operator()() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = (static_cast<double>(gen_() >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(gen_() >> 11) * 0x1.0p-53;          // [0, 1)
    const double r = std::sqrt(-2.0 * std::log(u1)), t = 2.0 * std::numbers::pi * u2;
    spare_ = r * std::sin(t);
    has_spare_ = true;
    return r * std::cos(t);
  }

 private:
  std::mt19937_64 gen_;
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace detail

// The m x d FAVOR+ projection. orthogonal: rows come in blocks of d that are orthogonalized with
// Eigen's Householder QR of a Gaussian d x d matrix (the last block keeps its first m mod d rows),
// then row r is rescaled to the norm of an independent Gaussian d-vector (chi_d distributed), as in
// Performer's gaussian_orthogonal_random_matrix. Otherwise iid N(0, 1) entries. Deterministic for a
// seed. A template (Real: the precision of the orthogonalization) so that only translation units
// that call it instantiate Eigen's QR, which took ~7 of the ~10 s g++ spent on attnkit.hpp.
template <class Real = double>
favor_projection make_favor_projection(index_t m, index_t d, std::uint64_t seed, bool orthogonal = true) {
  detail::require(m >= 1, "make_favor_projection", "m", "a feature count >= 1", m);
  detail::require(d >= 1, "make_favor_projection", "d", "a head dimension >= 1", d);
  favor_projection r;
  r.features = m;
  r.dim = d;
  r.values.assign(static_cast<std::size_t>(m * d), 0.f);
  detail::normal_source normal(seed);
  if (!orthogonal) {
    for (auto& x : r.values) x = static_cast<float>(normal());
    return r;
  }
  using matrix = Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic>;
  matrix rows(m, d);
  for (index_t r0 = 0; r0 < m; r0 += d) {
    matrix g(d, d);
    for (index_t i = 0; i < d; ++i)
      for (index_t j = 0; j < d; ++j) g(i, j) = static_cast<Real>(normal());
    const matrix q = Eigen::HouseholderQR<matrix>(g).householderQ();
    const index_t take = std::min(d, m - r0);
    rows.middleRows(r0, take) = q.transpose().topRows(take);  // orthonormal rows
  }
  for (index_t i = 0; i < m; ++i) {
    double sq = 0;
    for (index_t j = 0; j < d; ++j) {
      const double x = normal();
      sq += x * x;
    }
    const double norm = std::sqrt(sq);
    for (index_t j = 0; j < d; ++j) r.values[static_cast<std::size_t>(i * d + j)] = static_cast<float>(norm * rows(i, j));
  }
  return r;
}

// ---- recurrent state --------------------------------------------------------------------------------

// The causal prefix of a linear-attention problem, per (batch, head): the (stabilized) state
// S = sum_j gamma^(t-1-j) phi(k_j) v_j^T (features x value_dim), the normalizer z = sum_j
// gamma^(t-1-j) phi(k_j), the FAVOR+ key stabilizer (running key maximum, -inf before the first key)
// and the number of tokens appended. Acc is the accumulation type (float, or double).
// heads is either q's query heads (a state per query head) or its kv heads: with grouped heads whose
// decay is equal within each group (or absent), the query heads of a group have equal states, and a
// state per kv head holds it once (group x less memory, and a decode step reads and writes it once
// for the whole group). The outputs are bitwise the same either way.
// linear_attention(..., state) appends a whole sequence (prefill), linear_attention_step one token.
// A state serves one feature map and projection; reset() empties it.
template <class Acc = float>
struct linear_attention_state {
  static_assert(std::is_same_v<Acc, float> || std::is_same_v<Acc, double>,
                "linear_attention_state accumulates in float or double");

  index_t batch = 0, heads = 0, features = 0, value_dim = 0;
  index_t position = 0;    // tokens appended so far
  std::vector<Acc> s;      // [batch][head][feature][value_dim]
  std::vector<Acc> z;      // [batch][head][feature]
  std::vector<Acc> key_max;  // [batch][head], favor_positive only

  linear_attention_state() = default;
  linear_attention_state(index_t batch_, index_t heads_, index_t features_, index_t value_dim_)
      : batch(batch_), heads(heads_), features(features_), value_dim(value_dim_) {
    const char* fn = "linear_attention_state";
    detail::require(batch >= 0, fn, "batch", "a value >= 0", batch);
    detail::require(heads >= 0, fn, "heads", "a value >= 0", heads);
    detail::require(features >= 0, fn, "features", "a value >= 0", features);
    detail::require(value_dim >= 0, fn, "value_dim", "a value >= 0", value_dim);
    index_t count = 0;  // the storage's element count, computed without wrapping
    const bool overflow = __builtin_mul_overflow(batch, heads, &count) || __builtin_mul_overflow(count, features, &count) ||
                          __builtin_mul_overflow(count, value_dim, &count);
    detail::require(!overflow, fn, "batch * heads * features * value_dim", "an element count that fits in index_t",
                    "an overflowing product");
    s.resize(static_cast<std::size_t>(batch * heads * features * value_dim));
    z.resize(static_cast<std::size_t>(batch * heads * features));
    key_max.resize(static_cast<std::size_t>(batch * heads));
    reset();
  }

  void reset() {
    std::fill(s.begin(), s.end(), Acc(0));
    std::fill(z.begin(), z.end(), Acc(0));
    std::fill(key_max.begin(), key_max.end(), -std::numeric_limits<Acc>::infinity());
    position = 0;
  }
};

namespace detail {

// ---- argument checks ------------------------------------------------------------------------------

template <class TQ, class TK, class TV, class TO>
void check_linear_element_types() {
  static_assert(is_input_element_v<std::remove_const_t<TQ>> && is_input_element_v<std::remove_const_t<TK>> &&
                    is_input_element_v<std::remove_const_t<TV>>,
                "q, k, v elements must be float, double, attnkit::bf16 or attnkit::f16");
  static_assert(is_output_element_v<TO>, "out elements must be (non-const) float or double");
}

// double when any input is double, float otherwise.
template <class TQ, class TK, class TV>
using linear_accum_t =
    std::conditional_t<std::is_same_v<accum_t<TQ>, double> || std::is_same_v<accum_t<TK>, double> ||
                           std::is_same_v<accum_t<TV>, double>,
                       double, float>;

struct linear_shape {
  attention_shape s;
  index_t features = 0;
};

// The shape checks of validate_attention (with default attention_params and no lse). That function
// formats its messages before testing (an ostringstream per check, microseconds per call, which
// would dominate a decode step), so when the shapes pass exactly the conditions it tests the shape
// is built here, and otherwise it runs and throws its usual message.
template <class TQ, class TK, class TV, class TO>
attention_shape linear_attention_shape(std::string_view fn, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                                       const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out) {
  attention_shape s;
  s.batch = q.extent(0);
  s.q_len = q.extent(1);
  s.q_heads = q.extent(2);
  s.head_dim = q.extent(3);
  s.kv_len = k.extent(1);
  s.kv_heads = k.extent(2);
  s.value_dim = v.extent(3);
  const bool ok = k.extent(0) == s.batch && k.extent(3) == s.head_dim && (s.q_heads == 0 || s.kv_heads >= 1) &&
                  (s.kv_heads == 0 || s.q_heads % s.kv_heads == 0) &&
                  v.extents() == std::array<index_t, 4>{s.batch, s.kv_len, s.kv_heads, s.value_dim} &&
                  out.extents() == std::array<index_t, 4>{s.batch, s.q_len, s.q_heads, s.value_dim};
  return ok ? s : validate_attention(fn, q, k, v, out, attention_params{}, tensor_view<const float, 3>{});
}

// Checks run on every call (including every decode step), so the messages are built only on failure.
template <class TQ, class TK, class TV, class TO>
linear_shape validate_linear(std::string_view fn, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                             const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out, const linear_params& p) {
  linear_shape r;
  r.s = linear_attention_shape(fn, q, k, v, out);
  const attention_shape& s = r.s;
  const int phi = static_cast<int>(p.phi);
  require(phi >= 0 && phi <= static_cast<int>(feature_map::favor_positive), fn, "params.phi",
          "a feature_map enumerator", phi);
  const bool favor = p.phi == feature_map::favor_positive;
  require(std::isfinite(p.eps) && p.eps >= 0.f, fn, "params.eps", "a finite value >= 0", p.eps);
  require(std::isfinite(p.scale) && (!favor || p.scale >= 0.f), fn, "params.scale",
          favor ? "a finite value >= 0 (0 for 1/sqrt(head_dim))" : "a finite value", p.scale);
  if (p.causal && s.kv_len != s.q_len)
    fail(fn, "k", concat("sequence length ", s.q_len, " (as q: causal linear attention needs Nq == Nk)"),
         concat(s.kv_len));
  if (p.decay != nullptr) {
    require(p.causal, fn, "params.decay", "nullptr unless params.causal (decay is causal only)",
            "a decay with causal = false");
    for (index_t h = 0; h < s.q_heads; ++h)
      if (!(p.decay[h] > 0.f && p.decay[h] <= 1.f))
        fail(fn, concat("params.decay[", h, "]"), "a value in (0, 1]", concat(p.decay[h]));
  }
  const bool has_projection = p.projection.data() != nullptr || !p.projection.empty();
  const auto projection_extents = [&] { return extents_string(p.projection.extents().data(), 2); };
  if (favor) {
    if (!has_projection || p.projection.extent(0) < 1)
      fail(fn, "params.projection", "an m x d feature matrix for favor_positive (see make_favor_projection)",
           projection_extents());
    if (p.projection.extent(1) != s.head_dim)
      fail(fn, "params.projection", concat("logical extents (feature, dim) with dim = head_dim ", s.head_dim),
           projection_extents());
    for (index_t f = 0; f < p.projection.extent(0); ++f)
      for (index_t d = 0; d < p.projection.extent(1); ++d)
        if (!std::isfinite(p.projection(f, d)))
          fail(fn, concat("params.projection(", f, ", ", d, ")"), "a finite value", concat(p.projection(f, d)));
    r.features = p.projection.extent(0);
  } else {
    if (has_projection)
      fail(fn, "params.projection",
           concat("an empty view (only favor_positive uses it; phi is ", feature_map_name(p.phi), ")"),
           projection_extents());
    r.features = s.head_dim;
  }
  return r;
}

// Returns the query heads per state: 1 (a state per query head), or the GQA group when the state
// has one per kv head, which needs the decay to be equal within each group.
template <class Acc>
index_t validate_linear_state(std::string_view fn, const linear_attention_state<Acc>& st, const linear_shape& ls,
                              const linear_params& p) {
  require(p.causal, fn, "params.causal", "true (a state carries a causal prefix)", "false");
  if (st.batch != ls.s.batch) fail(fn, "state.batch", concat(ls.s.batch, " (as q)"), concat(st.batch));
  if (st.heads != ls.s.q_heads && st.heads != ls.s.kv_heads)
    fail(fn, "state.heads",
         concat(ls.s.q_heads, " (a state per query head) or ", ls.s.kv_heads, " (a state per kv head)"),
         concat(st.heads));
  if (st.features != ls.features)
    fail(fn, "state.features", concat(ls.features, " (", feature_map_name(p.phi), " features)"),
         concat(st.features));
  if (st.value_dim != ls.s.value_dim)
    fail(fn, "state.value_dim", concat(ls.s.value_dim, " (as v)"), concat(st.value_dim));
  const auto bh = static_cast<std::size_t>(st.batch * st.heads);
  const bool sized = st.s.size() == bh * static_cast<std::size_t>(st.features * st.value_dim) &&
                     st.z.size() == bh * static_cast<std::size_t>(st.features) && st.key_max.size() == bh;
  if (!sized)
    fail(fn, "state", "storage sized by its batch, heads, features and value_dim",
         concat("s/z/key_max of ", st.s.size(), "/", st.z.size(), "/", st.key_max.size(), " elements"));
  const index_t group = st.heads == ls.s.q_heads ? 1 : ls.s.group();
  if (p.decay)
    for (index_t h = 0; h < ls.s.q_heads; ++h)
      if (p.decay[h] != p.decay[h / group * group])
        fail(fn, concat("params.decay[", h, "]"),
             concat("the decay of query head ", h / group * group, " (", p.decay[h / group * group],
                    "): a state per kv head serves query heads of equal decay"),
             concat(p.decay[h]));
  return group;
}

// ---- small vector helpers: SIMD for float, plain loops for double ------------------------------------

template <class Acc>
inline Acc vdot(const Acc* a, const Acc* b, index_t n) {
  if constexpr (std::is_same_v<Acc, float>) {
    return simd::dot(a, b, n);
  } else {
    Acc s = 0;
    for (index_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }
}

alignas(64) inline constexpr float lane_ids[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static_assert(simd::width <= 16, "lane_ids covers at most 16 float lanes");

// Sum of x[0, n). Reads (but ignores) up to kernels::pad_to_width(n) elements: x must be padded.
template <class Acc>
inline Acc vsum_padded(const Acc* x, index_t n) {
  if constexpr (std::is_same_v<Acc, float>) {
    simd::vec acc(0.f);
    index_t i = 0;
    for (; i + simd::width <= n; i += simd::width) acc += simd::load(x + i);
    if (i < n) {
      const auto keep = simd::load(lane_ids) < simd::vec(static_cast<float>(n - i));
      acc += xsimd::select(keep, simd::load(x + i), simd::vec(0.f));
    }
    return simd::hsum(acc);
  } else {
    Acc s = 0;
    for (index_t i = 0; i < n; ++i) s += x[i];
    return s;
  }
}

template <class Acc>
inline void vaxpy(Acc* y, Acc a, const Acc* x, index_t n) {
  if constexpr (std::is_same_v<Acc, float>) {
    simd::axpy(y, a, x, n);
  } else {
    for (index_t i = 0; i < n; ++i) y[i] += a * x[i];
  }
}

// y[i] += x[0][i] + x[1][i] + ... + x[rows - 1][i] for i < n (row r at x + r * ld), summed in row
// order (the same result as one vaxpy per row) with the running sums in registers.
template <class Acc>
inline void vadd_rows(Acc* y, const Acc* x, index_t ld, index_t rows, index_t n) {
  index_t i = 0;
  if constexpr (std::is_same_v<Acc, float>) {
    constexpr index_t W = simd::width;
    for (; i + 2 * W <= n; i += 2 * W) {
      simd::vec a0 = simd::load(y + i), a1 = simd::load(y + i + W);
      for (index_t r = 0; r < rows; ++r) {
        a0 += simd::load(x + r * ld + i);
        a1 += simd::load(x + r * ld + i + W);
      }
      simd::store(y + i, a0);
      simd::store(y + i + W, a1);
    }
    for (; i + W <= n; i += W) {
      simd::vec a = simd::load(y + i);
      for (index_t r = 0; r < rows; ++r) a += simd::load(x + r * ld + i);
      simd::store(y + i, a);
    }
  }
  for (; i < n; ++i) {
    Acc a = y[i];
    for (index_t r = 0; r < rows; ++r) a += x[r * ld + i];
    y[i] = a;
  }
}

template <class Acc>
inline void vscale(Acc* x, Acc a, index_t n) {
  if constexpr (std::is_same_v<Acc, float>) {
    simd::scale(x, a, n);
  } else {
    for (index_t i = 0; i < n; ++i) x[i] *= a;
  }
}

// dst[i] = exp(src[i] - shift).
template <class Acc>
inline void vexp_shift(Acc* dst, const Acc* src, index_t n, Acc shift) {
  if constexpr (std::is_same_v<Acc, float>) {
    const simd::vec sh(shift);
    index_t i = 0;
    for (; i + simd::width <= n; i += simd::width) simd::store(dst + i, simd::exp(simd::load(src + i) - sh));
    if (i < n) simd::store_tail(dst + i, simd::exp(simd::load_tail(src + i, n - i) - sh), n - i);
  } else {
    for (index_t i = 0; i < n; ++i) dst[i] = std::exp(src[i] - shift);
  }
}

// Maximum of n values ignoring NaN (-inf when there is none).
template <class Acc>
inline Acc max_ignoring_nan(const Acc* x, index_t n) {
  Acc m = -std::numeric_limits<Acc>::infinity();
  for (index_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// dst[i] = Acc(src[i * stride]).
template <class Acc, class T>
inline void load_row(Acc* dst, const T* src, index_t stride, index_t n) {
  if constexpr (std::is_same_v<Acc, float> && !std::is_same_v<std::remove_cv_t<T>, double>) {
    if (stride == 1) return simd::convert_row(dst, src, n);
  }
  for (index_t i = 0; i < n; ++i) dst[i] = convert<Acc>(src[i * stride]);
}

// The rows of one (batch, head) of a (batch, seq, head, dim) view: row t starts at base + t * ld,
// its elements inc apart. Hot loops address rows through this rather than tensor_view's 4-index
// operator(), whose offset GCC vectorizes through the stack: a store-forwarding stall per row that
// waits behind every pending store (out rows still missing the cache included).
template <class T>
struct head_rows {
  T* base = nullptr;
  index_t ld = 0, inc = 1, n = 0;  // n: elements per row
  T* operator()(index_t t) const { return base + t * ld; }
};

template <class T>
head_rows<T> rows_of(const tensor_view<T, 4>& x, index_t b, index_t head) {
  return {x.data() + b * x.stride(0) + head * x.stride(2), x.stride(1), x.stride(3), x.extent(3)};
}

// Prefetches row t (L2 hint; rw = 1 for a row about to be written). The operators walk one head of
// a (batch, seq, head, dim) tensor, a strided pattern the hardware prefetchers follow poorly once
// the tensors leave the caches; asking a chunk or two ahead hides it.
template <int RW = 0, class T>
[[gnu::always_inline]] inline void prefetch_row(const head_rows<T>& x, index_t t) {
  if (x.n > 0) simd::prefetch<2, RW>(x(t), std::size_t((x.n - 1) * x.inc + 1) * sizeof(T));
}

// elu(x) + 1 on a vector: exp(x) for x <= 0 (simd::exp_fast, within 2 ulp), x + 1 above; NaN stays NaN.
inline simd::vec elu_plus_one_vec(const simd::vec& v) {
  return xsimd::select(v <= simd::vec(0.f), simd::exp_fast(v), v + simd::vec(1.f));
}

// The prefetches of rows [t0, t0 + L) of a head's q, k, v and out (out for writing; a tensor given
// as {} is skipped), spread over a chunk's arithmetic: step(n) issues the next n (position, tensor)
// rows, positions in order. A burst of a chunk's hundreds of line prefetches at once waits on the
// line fill buffers with nothing else to do; a few at a time between the GEMM blocks, the waits
// overlap the arithmetic.
template <class TQ, class TK, class TV, class TO>
struct chunk_prefetcher {
  head_rows<TQ> q;
  head_rows<TK> k;
  head_rows<TV> v;
  head_rows<TO> out;
  index_t t0 = 0, end = 0, next = 0;  // next and end count (position, tensor) pairs
  int which[4] = {}, count = 0;       // the tensors present, in the order q, k, v, out

  chunk_prefetcher(head_rows<TQ> q_, head_rows<TK> k_, head_rows<TV> v_, head_rows<TO> out_, index_t first,
                   index_t rows)
      : q(q_), k(k_), v(v_), out(out_), t0(first) {
    const index_t n[4] = {q.n, k.n, v.n, out.n};
    for (int t = 0; t < 4; ++t)
      if (n[t] > 0) which[count++] = t;
    end = count * std::max<index_t>(rows, 0);
  }

  [[gnu::always_inline]] inline void step(index_t n) {
    for (const index_t e = std::min(next + n, end); next < e; ++next) {
      const index_t j = t0 + next / count;
      switch (which[next % count]) {
        case 0: prefetch_row(q, j); break;
        case 1: prefetch_row(k, j); break;
        case 2: prefetch_row(v, j); break;
        default: prefetch_row<1>(out, j); break;
      }
    }
  }
};

// Elementwise / per-row feature maps (all but favor_positive), in place on `rows` rows of n values
// (row r at x + r * ld): a whole chunk per call, so the switch and elu's constants are set up once.
template <class Acc>
inline void map_rows(feature_map phi, Acc* x, index_t ld, index_t rows, index_t n) {
  switch (phi) {
    case feature_map::identity:
    case feature_map::favor_positive: return;
    case feature_map::elu_plus_one:
      if constexpr (std::is_same_v<Acc, float>) {
        for (index_t r = 0; r < rows; ++r) {
          float* xr = x + r * ld;
          index_t i = 0;
          for (; i + simd::width <= n; i += simd::width) simd::store(xr + i, elu_plus_one_vec(simd::load(xr + i)));
          if (i < n) simd::store_tail(xr + i, elu_plus_one_vec(simd::load_tail(xr + i, n - i)), n - i);
        }
      } else {
        for (index_t r = 0; r < rows; ++r)
          for (index_t i = 0; i < n; ++i) x[r * ld + i] = kernels::elu_plus_one(x[r * ld + i]);
      }
      return;
    case feature_map::relu:
      for (index_t r = 0; r < rows; ++r) {
        Acc* xr = x + r * ld;
        index_t i = 0;
        if constexpr (std::is_same_v<Acc, float>) {
          const simd::vec zero(0.f);
          for (; i + simd::width <= n; i += simd::width) {
            const simd::vec v = simd::load(xr + i);
            simd::store(xr + i, xsimd::select(v < zero, zero, v));
          }
        }
        for (; i < n; ++i) xr[i] = kernels::relu(xr[i]);
      }
      return;
    case feature_map::cosine:
      for (index_t r = 0; r < rows; ++r) {
        Acc* xr = x + r * ld;
        Acc sq = vdot(xr, xr, n);
        if (sq < std::numeric_limits<Acc>::min() || sq > std::numeric_limits<Acc>::max()) {
          // |x|^2 underflows (|x| below ~1e-19 in float, subnormal rows) or overflows (above ~1e19):
          // x / |x| does not depend on the scale, so divide by the largest |x_i| first.
          Acc m = 0;
          for (index_t i = 0; i < n; ++i) m = std::max(m, std::abs(xr[i]));
          if (m > 0 && m <= std::numeric_limits<Acc>::max()) {
            for (index_t i = 0; i < n; ++i) xr[i] /= m;
            sq = vdot(xr, xr, n);
          }
        }
        vscale(xr, sq == 0 ? Acc(0) : Acc(1) / std::sqrt(sq), n);
      }
      return;
  }
}

// phi of rows [t0, t0 + L) of x (elementwise / per-row maps) into dst (row j at dst + j * ldd, n values):
// elu + 1 on contiguous float rows is applied as the rows are loaded (one pass, no reload); other
// maps and layouts load the rows, then map them in place.
template <class Acc, class T>
inline void load_feature_rows(feature_map phi, const head_rows<T>& x, index_t t0, index_t L, Acc* dst, index_t ldd,
                              index_t n) {
  if (n <= 0) return;
  if constexpr (std::is_same_v<Acc, float> && std::is_same_v<std::remove_cv_t<T>, float>) {
    if (phi == feature_map::elu_plus_one && x.inc == 1) {
      for (index_t j = 0; j < L; ++j) {
        const float* src = x(t0 + j);
        float* d = dst + j * ldd;
        index_t i = 0;
        for (; i + simd::width <= n; i += simd::width) simd::store(d + i, elu_plus_one_vec(simd::load(src + i)));
        if (i < n) simd::store_tail(d + i, elu_plus_one_vec(simd::load_tail(src + i, n - i)), n - i);
      }
      return;
    }
  }
  for (index_t j = 0; j < L; ++j) load_row(dst + j * ldd, x(t0 + j), x.inc, n);
  map_rows(phi, dst, ldd, L, n);
}

// ---- tile arithmetic --------------------------------------------------------------------------------

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: whole width x width blocks through
// simd::transpose (in registers with AVX-512), the rest element by element.
template <class Acc>
inline void transpose_rows(const Acc* src, index_t lds, index_t rows, index_t cols, Acc* dst, index_t ldd) {
  index_t r0 = 0;
  if constexpr (std::is_same_v<Acc, float>) {
    constexpr index_t W = simd::width;
    const index_t rf = rows / W * W, cf = cols / W * W;
    for (index_t r = 0; r < rf; r += W)
      for (index_t c = 0; c < cf; c += W) {
        simd::vec t[W];
        for (index_t i = 0; i < W; ++i) t[i] = simd::load(src + (r + i) * lds + c);
        simd::transpose(t);
        for (index_t i = 0; i < W; ++i) simd::store(dst + (c + i) * ldd + r, t[i]);
      }
    // Left: the columns beyond cf of rows < rf; below: all columns of rows >= rf.
    for (index_t c = cf; c < cols; ++c)
      for (index_t r = 0; r < rf; ++r) dst[c * ldd + r] = src[r * lds + c];
    r0 = rf;
  }
  for (index_t c = 0; c < cols; ++c)
    for (index_t r = r0; r < rows; ++r) dst[c * ldd + r] = src[r * lds + c];
}

// Lower-triangular block product: o[i][:] += sum_{j <= i} p[i][j] * v[j][:] for i, j < R. Entries of p
// above the diagonal and rows of v beyond a row's diagonal are never read. Register-blocked like
// gemm_acc: R rows x NV vectors of accumulators; the column index J is a template parameter so every
// loop has a constant trip count and the accumulators stay in registers.
template <int R, int NV, int J>
inline void tri_column(simd::vec (&acc)[R][NV], const float* p, index_t ldp, const float* v, index_t ldv) {
  if constexpr (J < R) {
    constexpr index_t W = simd::width;
    simd::vec bv[NV];
    for (int n = 0; n < NV; ++n) bv[n] = simd::in_register(simd::load(v + J * ldv + n * W));
    for (int i = J; i < R; ++i) {
      const simd::vec pij(p[i * ldp + J]);
      for (int n = 0; n < NV; ++n) acc[i][n] = simd::fma(pij, bv[n], acc[i][n]);
    }
    tri_column<R, NV, J + 1>(acc, p, ldp, v, ldv);
  }
}

template <int R, int NV>
inline void tri_block(const float* p, index_t ldp, const float* v, index_t ldv, float* o, index_t ldo) {
  constexpr index_t W = simd::width;
  simd::vec acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < NV; ++n) acc[i][n] = simd::load(o + i * ldo + n * W);
  tri_column<R, NV, 0>(acc, p, ldp, v, ldv);
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < NV; ++n) simd::store(o + i * ldo + n * W, acc[i][n]);
}

template <int R>
inline void tri_rows(index_t N, const float* p, index_t ldp, const float* v, index_t ldv, float* o, index_t ldo) {
  constexpr index_t W = simd::width;
  // Blocks of 3 vectors, with 4 remaining vectors taken as 2 + 2 rather than 3 + 1 (an R x 1 block
  // waits on the FMA latency), as gemm_acc does.
  index_t n = 0;
  for (; N - n >= 3 * W && N - n != 4 * W; n += 3 * W) tri_block<R, 3>(p, ldp, v + n, ldv, o + n, ldo);
  for (; N - n >= 2 * W; n += 2 * W) tri_block<R, 2>(p, ldp, v + n, ldv, o + n, ldo);
  if (N - n >= W) tri_block<R, 1>(p, ldp, v + n, ldv, o + n, ldo);
}

template <int R>
inline void tri_dispatch(index_t rows, index_t N, const float* p, index_t ldp, const float* v, index_t ldv, float* o,
                         index_t ldo) {
  if constexpr (R > 0) {
    if (rows == R) return tri_rows<R>(N, p, ldp, v, ldv, o, ldo);
    tri_dispatch<R - 1>(rows, N, p, ldp, v, ldv, o, ldo);
  }
}

template <class Acc>
inline void tri_acc(index_t rows, index_t N, const Acc* p, index_t ldp, const Acc* v, index_t ldv, Acc* o,
                    index_t ldo) {
  if constexpr (std::is_same_v<Acc, float>) {
    tri_dispatch<kernels::gemm_mr>(rows, N, p, ldp, v, ldv, o, ldo);
  } else {
    for (index_t i = 0; i < rows; ++i)
      for (index_t j = 0; j <= i; ++j) vaxpy(o + i * ldo, p[i * ldp + j], v + j * ldv, N);
  }
}

// ---- plan and scratch -------------------------------------------------------------------------------

inline constexpr index_t linear_chunk = 32;           // positions per causal chunk
inline constexpr index_t linear_block = 64;           // keys / queries per block of the non-causal form
inline constexpr index_t linear_head_group = 2;       // query heads per causal task without GQA, walked together
inline constexpr index_t linear_prefetch_ahead = 64;  // causal: positions between a chunk and its prefetch
static_assert(linear_chunk % 16 == 0, "a causal chunk is a whole number of vectors of every simd::width");

template <class Acc>
struct linear_plan {
  feature_map phi = feature_map::elu_plus_one;
  bool normalize = true;
  Acc eps = 0, log_eps = 0;
  index_t D = 0, F = 0, Fp = 0, Dv = 0, Dvp = 0;
  Acc half_scale = 0;     // favor: scale / 2 (|x'|^2 / 2 = half_scale * |x|^2)
  Acc half_log_m = 0;     // favor: log(m) / 2, the 1/sqrt(m) factor folded into the exponent
  std::vector<Acc> wt;    // favor: sqrt(scale) * W^T, D x Fp row-major, zero padded
  bool favor() const { return phi == feature_map::favor_positive; }
};

template <class Acc>
linear_plan<Acc> make_linear_plan(const linear_shape& ls, const linear_params& p) {
  linear_plan<Acc> pl;
  pl.phi = p.phi;
  pl.normalize = p.normalize;
  pl.eps = static_cast<Acc>(p.eps);
  pl.log_eps = p.eps > 0.f ? std::log(pl.eps) : Acc(0);
  pl.D = ls.s.head_dim;
  pl.F = ls.features;
  pl.Fp = kernels::pad_to_width(std::max(pl.F, pl.D));
  pl.Dv = ls.s.value_dim;
  pl.Dvp = kernels::pad_to_width(pl.Dv);
  if (pl.favor()) {
    const Acc scale = effective_scale<Acc>(p.scale, pl.D);
    const Acc root = std::sqrt(scale);
    pl.half_scale = scale / 2;
    pl.half_log_m = std::log(static_cast<Acc>(pl.F)) / 2;
    pl.wt.assign(static_cast<std::size_t>(std::max<index_t>(pl.D * pl.Fp, 1)), Acc(0));
    for (index_t f = 0; f < pl.F; ++f)
      for (index_t d = 0; d < pl.D; ++d) pl.wt[static_cast<std::size_t>(d * pl.Fp + f)] = root * static_cast<Acc>(p.projection(f, d));
  }
  return pl;
}

// p rounded up to a cache line (64 bytes). The operator's buffers are std::vectors, whose blocks
// are only 16-byte aligned: every vector load and store of the GEMMs on them would straddle two
// lines. Each buffer is allocated one line longer and used from its first line boundary.
template <class Acc>
Acc* line_aligned(Acc* p) {
  constexpr std::uintptr_t line = 64;
  return reinterpret_cast<Acc*>((reinterpret_cast<std::uintptr_t>(p) + line - 1) & ~(line - 1));
}
inline constexpr std::size_t line_slack = 64;  // elements of slack (>= one line of any Acc) for line_aligned

// Per-task buffers for chunks of up to `rows` positions (linear_chunk for the parallel forms, 1 for
// a decode step), carved from one zero-initialized allocation; padding columns are never written and
// stay 0.
template <class Acc>
struct linear_scratch {
  index_t rows = 0, lda = 0, Dvp = 0;
  std::vector<Acc> buf;
  Acc* aq = nullptr;   // rows x (F + rows): [phi(Q) | P]
  Acc* kr = nullptr;   // rows x F: phi(K)
  Acc* kt = nullptr;   // F x rows: phi(K)^T (causal scores)
  Acc* sv = nullptr;   // rows x Dvp: a block's values (non-causal key side), v_t (decode)
  Acc* o = nullptr;    // rows x Dvp
  Acc* u = nullptr;    // rows x Fp: FAVOR+ logits and feature rows
  Acc* x = nullptr;    // rows x D: raw rows for FAVOR+
  Acc *z = nullptr, *den = nullptr, *stab = nullptr, *hn = nullptr, *colscale = nullptr;

  linear_scratch(const linear_plan<Acc>& pl, index_t r) : rows(r), lda(pl.F + r), Dvp(pl.Dvp) {
    const index_t sizes[] = {r * lda, pl.F * r, pl.F * r, r * pl.Dvp, r * pl.Dvp, r * pl.Fp,
                             r * pl.D, pl.F, r, r, r, pl.Dvp};
    Acc** slots[] = {&aq, &kr, &kt, &sv, &o, &u, &x, &z, &den, &stab, &hn, &colscale};
    index_t total = 0;
    for (index_t n : sizes) total += kernels::pad_to_width(n) + simd::width;  // vector-aligned offsets
    buf.assign(static_cast<std::size_t>(total) + line_slack, Acc(0));
    Acc* base = line_aligned(buf.data());
    index_t off = 0;
    for (std::size_t i = 0; i < std::size(sizes); ++i) {
      *slots[i] = base + off;
      off += kernels::pad_to_width(sizes[i]) + simd::width;
    }
  }
};

// ---- feature rows -------------------------------------------------------------------------------------

// FAVOR+ logits of rows [t0, t0 + L) of x: u[j][f] = (W x'_j)_f into ws.u (ld Fp), and
// hn[j] = |x'_j|^2 / 2.
template <class Acc, class T>
void favor_logits(const linear_plan<Acc>& pl, const head_rows<T>& x, index_t t0, index_t L, linear_scratch<Acc>& ws) {
  Acc* X = ws.x;
  for (index_t j = 0; j < L; ++j) {
    if (pl.D > 0) load_row(X + j * pl.D, x(t0 + j), x.inc, pl.D);
    ws.hn[j] = pl.half_scale * vdot(X + j * pl.D, X + j * pl.D, pl.D);
  }
  Acc* U = ws.u;
  std::fill(U, U + L * pl.Fp, Acc(0));
  kernels::gemm_acc(L, pl.Fp, pl.D, X, pl.D, index_t(1), pl.wt.data(), pl.Fp, U, pl.Fp);
}

// phi of query rows [t0, t0 + L) into dst (ld ldd); stab[j] = the row's stabilizer M_q (0 unless favor).
template <class Acc, class T>
void query_features(const linear_plan<Acc>& pl, const head_rows<T>& q, index_t t0, index_t L,
                    linear_scratch<Acc>& ws, Acc* dst, index_t ldd, Acc* stab) {
  if (pl.favor()) {
    favor_logits(pl, q, t0, L, ws);
    for (index_t j = 0; j < L; ++j) {
      const Acc* u = ws.u + j * pl.Fp;
      const Acc mq = max_ignoring_nan(u, pl.F);
      stab[j] = mq - ws.hn[j];
      vexp_shift(dst + j * ldd, u, pl.F, mq + pl.half_log_m);
    }
    return;
  }
  std::fill(stab, stab + L, Acc(0));
  load_feature_rows(pl.phi, q, t0, L, dst, ldd, pl.D);
}

// phi of key rows [t0, t0 + L) into dst (row j at dst + j * ldd). For favor, updates the running key
// maximum M and returns the factor exp(M_old - M_new) by which the state accumulated so far must be
// rescaled (1 when M did not grow).
template <class Acc, class T>
Acc key_features(const linear_plan<Acc>& pl, const head_rows<T>& k, index_t t0, index_t L, linear_scratch<Acc>& ws,
                 Acc* dst, index_t ldd, Acc& M) {
  Acc factor = 1;
  if (pl.favor()) {
    favor_logits(pl, k, t0, L, ws);
    Acc bm = -std::numeric_limits<Acc>::infinity();
    for (index_t j = 0; j < L; ++j) {
      const Acc m = max_ignoring_nan(ws.u + j * pl.Fp, pl.F) - ws.hn[j];
      bm = m > bm ? m : bm;
    }
    if (bm > M) {
      factor = std::exp(M - bm);  // 0 when M was -inf (nothing accumulated yet)
      M = bm;
    }
    for (index_t j = 0; j < L; ++j)
      vexp_shift(dst + j * ldd, ws.u + j * pl.Fp, pl.F, ws.hn[j] + M + pl.half_log_m);
    return factor;
  }
  load_feature_rows(pl.phi, k, t0, L, dst, ldd, pl.D);
  return factor;
}

// dst[i * ds] = TO(o[i] * f) for i < n.
template <class Acc, class TO>
inline void scale_store(TO* dst, index_t ds, const Acc* o, Acc f, index_t n) {
  index_t i = 0;
  if constexpr (std::is_same_v<Acc, float> && std::is_same_v<TO, float>) {
    if (ds == 1) {
      const simd::vec vf(f);
      for (; i + simd::width <= n; i += simd::width) simd::store(dst + i, simd::load(o + i) * vf);
    }
  }
  for (; i < n; ++i) dst[i * ds] = static_cast<TO>(o[i] * f);
}

// dst[i * ds] = o / (den + eps') (normalize) or o * exp(stab) (not) for i < Dv, with the FAVOR+
// stabilizers undone.
template <class Acc, class TO>
inline void finalize_row(const linear_plan<Acc>& pl, const Acc* o, Acc den, Acc stab, TO* dst, index_t ds) {
  if (pl.Dv == 0) return;
  const Acc f = kernels::linear_output_factor(pl.normalize, pl.favor(), pl.eps, pl.log_eps, den, stab);
  scale_store(dst, ds, o, f, pl.Dv);
}

// ---- the causal chunked form -----------------------------------------------------------------------

// The running state of the causal form for query heads h .. h + nq - 1 of one batch: the heads of a
// GQA group whose decay and initial state are equal have equal states, so they share one.
template <class Acc>
struct causal_head {
  index_t h = 0, nq = 1, hk = 0;
  bool decayed = false;
  Acc M = 0;            // FAVOR+ running key maximum
  std::vector<Acc> sv;  // storage of s
  Acc* s = nullptr;     // (F + C) x Dvp: [S; V], the state on top of the chunk's values (line-aligned in sv)
  std::vector<Acc> z;   // F: normalizer
  std::vector<Acc> pw;  // C + 1: gamma^n
};

// One chunk [t0, t0 + L) (L <= linear_chunk) of the causal form runs in three parts:
// causal_keys (the chunk's keys and values, once per state), causal_queries (the outputs of one query
// head reading the state) and causal_advance (the chunk added to the state). Each part issues its
// share of the prefetches for a later chunk between its GEMM blocks.

// phi(K) into ws.kr and transposed into ws.kt, V below the state; a grown FAVOR+ key maximum
// rescales S, z.
template <class Acc, class TK, class TV>
void causal_keys(const linear_plan<Acc>& pl, const head_rows<TK>& kr, const head_rows<TV>& vr, index_t t0, index_t L,
                 causal_head<Acc>& hs, linear_scratch<Acc>& ws) {
  const index_t F = pl.F, Dv = pl.Dv, Dvp = pl.Dvp;
  Acc* S = hs.s;
  const Acc r = key_features(pl, kr, t0, L, ws, ws.kr, F, hs.M);
  if (r != Acc(1)) {
    vscale(S, r, F * Dvp);
    vscale(hs.z.data(), r, F);
  }
  transpose_rows(ws.kr, F, L, F, ws.kt, linear_chunk);
  if (Dv > 0)
    for (index_t j = 0; j < L; ++j) load_row(S + (F + j) * Dvp, vr(t0 + j), vr.inc, Dv);
}

// Rows [t0, t0 + L) of one query head's output from the state before the chunk and the chunk's keys.
// pfr: 4 prefetch steps per GEMM row block and 2 per output row (with AVX2's 4-row blocks and C = 32
// positions, the 2 C rows of a head's q and out are asked for by the end of the second GEMM). (Steps
// of 8 between GEMM blocks only, none among the output rows, measured 2-3% slower.)
template <class Acc, class TQ, class TO, class PF>
void causal_queries(const linear_plan<Acc>& pl, const head_rows<TQ>& qr, const head_rows<TO>& outr, index_t t0,
                    index_t L, const causal_head<Acc>& hs, linear_scratch<Acc>& ws, PF& pfr) {
  constexpr index_t C = linear_chunk, MR = kernels::gemm_mr;
  const index_t F = pl.F, Dvp = pl.Dvp, lda = ws.lda;
  Acc* AQ = ws.aq;  // [phi(Q) | P], lda = F + C
  const Acc* S = hs.s;
  const Acc* V = S + F * Dvp;
  Acc* O = ws.o;
  const Acc* z = hs.z.data();
  Acc* den = ws.den;
  Acc* stab = ws.stab;
  const Acc* pw = hs.pw.data();
  const bool decayed = hs.decayed;

  // Queries into the left block of AQ, then P = phi(Q) phi(K)^T into the right block, row block by
  // row block, computing only the columns up to the block's diagonal (rounded up to a vector).
  query_features(pl, qr, t0, L, ws, AQ, lda, stab);
  for (index_t r0 = 0; r0 < L; r0 += MR) {
    pfr.step(4);
    const index_t R = std::min(MR, L - r0), nc = kernels::pad_to_width(r0 + R);
    kernels::gemm_set(R, nc, F, AQ + r0 * lda, lda, index_t(1), ws.kt, C, AQ + r0 * lda + F, lda);
  }

  // Mask and decay P (j <= i only), the normalizers, and the inter-chunk decay of phi(q_i).
  for (index_t i = 0; i < L; ++i) {
    Acc* qi = AQ + i * lda;
    Acc* Pi = qi + F;
    if (decayed)
      for (index_t j = 0; j <= i; ++j) Pi[j] *= pw[i - j];
    Acc inter = vdot(qi, z, F);
    if (decayed) {
      inter *= pw[i + 1];
      vscale(qi, pw[i + 1], F);
    }
    den[i] = inter + vsum_padded(Pi, i + 1);
  }

  // O = [phi(Q) | P] [S; V]: per row block, the rectangle left of the block's diagonal by gemm_set
  // and the diagonal triangle by tri_acc (entries above the diagonal are never read).
  for (index_t r0 = 0; r0 < L; r0 += MR) {
    const index_t R = std::min(MR, L - r0);
    pfr.step(4);
    kernels::gemm_set(R, Dvp, F + r0, AQ + r0 * lda, lda, index_t(1), S, Dvp, O + r0 * Dvp, Dvp);
    tri_acc(R, Dvp, AQ + r0 * lda + F + r0, lda, V + r0 * Dvp, Dvp, O + r0 * Dvp, Dvp);
  }

  for (index_t i = 0; i < L; ++i) {
    pfr.step(2);
    finalize_row(pl, O + i * Dvp, den[i], stab[i] + hs.M, outr(t0 + i), outr.inc);
  }
}

// S = gamma^L S + sum_j gamma^(L-1-j) phi(k_j) v_j^T (A = phi(K)^T read from the rows in place), z
// likewise. pfr: 4 prefetch steps per GEMM row block (AVX2, C = 32, F = 64: the 2 C rows of k and v;
// the caller issues any rest).
template <class Acc, class PF>
void causal_advance(const linear_plan<Acc>& pl, index_t L, causal_head<Acc>& hs, linear_scratch<Acc>& ws, PF& pfr) {
  constexpr index_t MR = kernels::gemm_mr;
  const index_t F = pl.F, Dvp = pl.Dvp;
  Acc* KR = ws.kr;
  Acc* S = hs.s;
  Acc* z = hs.z.data();
  const Acc* pw = hs.pw.data();
  const Acc* cs = nullptr;
  if (hs.decayed) {
    for (index_t j = 0; j < L; ++j) vscale(KR + j * F, pw[L - 1 - j], F);
    std::fill(ws.colscale, ws.colscale + Dvp, pw[L]);
    cs = ws.colscale;
    vscale(z, pw[L], F);
  }
  for (index_t f0 = 0; f0 < F; f0 += MR) {
    pfr.step(4);
    kernels::gemm_acc(std::min(MR, F - f0), Dvp, L, KR + f0, index_t(1), F, S + F * Dvp, Dvp, S + f0 * Dvp, Dvp, cs);
  }
  vadd_rows(z, KR, F, L, F);
}

// The caller's states for linear_causal_heads. State i of batch b serves the query heads
// [i * group, (i + 1) * group): group 1 is a state per query head, the GQA group one per kv head.
// Initial states are read from in_*, final ones written to s, z, m by the first query head of each
// state only. in_* is a copy of the states when one state's heads are split over tasks (each task
// then computes it, and one of them may finish before another starts).
template <class Acc>
struct causal_state_io {
  const Acc *in_s = nullptr, *in_z = nullptr, *in_m = nullptr;
  Acc *s = nullptr, *z = nullptr, *m = nullptr;
  index_t heads = 0, group = 1;  // states per batch, query heads per state
  index_t index(index_t b, index_t h) const { return b * heads + h / group; }
};

// Query heads [h0, h0 + nh) of batch b, chunk by chunk and head by head within a chunk: in the
// common (batch, seq, head, dim) layout the heads of a position are adjacent, so a task that walks
// several heads together uses every cache line it brings in. io (optional) holds the caller's
// states, read at the start and written at the end. Consecutive heads of one kv head with equal
// decay and equal (bitwise) initial state share one state: the keys, values and state update of a
// chunk are computed once for them, exactly as each head would compute them alone.
template <class Acc, class TQ, class TK, class TV, class TO>
void linear_causal_heads(const linear_plan<Acc>& pl, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                         const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out, index_t b, index_t h0,
                         index_t nh, index_t group, const float* decay, linear_scratch<Acc>& ws,
                         std::vector<causal_head<Acc>>& heads, const causal_state_io<Acc>* io) {
  constexpr index_t C = linear_chunk;
  const index_t N = q.extent(1), F = pl.F, Dv = pl.Dv, Dvp = pl.Dvp;
  const auto same_state = [&](index_t a, index_t c) {  // heads h0 + a and h0 + c (a < c)
    const index_t ha = h0 + a, hc = h0 + c;
    if (ha / group != hc / group) return false;
    if (decay && std::memcmp(decay + ha, decay + hc, sizeof(float)) != 0) return false;
    if (!io) return true;
    const index_t sa = io->index(b, ha), sc = io->index(b, hc);
    const auto equal = [](const Acc* x, const Acc* y, index_t n) {  // (an empty state has no storage)
      return n == 0 || std::memcmp(x, y, static_cast<std::size_t>(n) * sizeof(Acc)) == 0;
    };
    return sa == sc || (equal(io->in_s + sa * F * Dv, io->in_s + sc * F * Dv, F * Dv) &&
                        equal(io->in_z + sa * F, io->in_z + sc * F, F) &&
                        (!pl.favor() || equal(io->in_m + sa, io->in_m + sc, 1)));
  };
  index_t ns = 0;  // states in use
  for (index_t i = 0; i < nh;) {
    index_t n = 1;
    while (i + n < nh && same_state(i, i + n)) ++n;
    causal_head<Acc>& hs = heads[static_cast<std::size_t>(ns++)];
    if (hs.sv.empty()) {
      hs.sv.assign(static_cast<std::size_t>((F + C) * Dvp) + line_slack, Acc(0));
      hs.s = line_aligned(hs.sv.data());
      hs.z.assign(static_cast<std::size_t>(std::max<index_t>(F, 1)), Acc(0));
      hs.pw.assign(static_cast<std::size_t>(C + 1), Acc(1));
    }
    hs.h = h0 + i;
    hs.nq = n;
    hs.hk = hs.h / group;
    hs.decayed = decay != nullptr && decay[hs.h] != 1.f;
    if (hs.decayed)
      for (index_t e = 0; e <= C; ++e)
        hs.pw[static_cast<std::size_t>(e)] = static_cast<Acc>(std::pow(double(decay[hs.h]), double(e)));
    // Initial state: zero, or the caller's prefix.
    std::fill(hs.s, hs.s + F * Dvp, Acc(0));
    std::fill(hs.z.begin(), hs.z.end(), Acc(0));
    hs.M = pl.favor() ? -std::numeric_limits<Acc>::infinity() : Acc(0);
    if (io) {
      const index_t si = io->index(b, h0 + i);
      for (index_t f = 0; f < F; ++f) {
        std::copy(io->in_s + (si * F + f) * Dv, io->in_s + (si * F + f + 1) * Dv, hs.s + f * Dvp);
        hs.z[static_cast<std::size_t>(f)] = io->in_z[si * F + f];
      }
      if (pl.favor()) hs.M = io->in_m[si];
    }
    i += n;
  }
  for (index_t t0 = 0; t0 < N; t0 += C) {
    const index_t L = std::min(C, N - t0);
    const index_t pf = t0 + linear_prefetch_ahead, Lpf = std::min(C, std::max<index_t>(0, N - pf));
    for (index_t si = 0; si < ns; ++si) {
      causal_head<Acc>& hs = heads[static_cast<std::size_t>(si)];
      const head_rows<TK> kr = rows_of(k, b, hs.hk);
      const head_rows<TV> vr = rows_of(v, b, hs.hk);
      causal_keys(pl, kr, vr, t0, L, hs, ws);
      for (index_t h = hs.h; h < hs.h + hs.nq; ++h) {
        const head_rows<TQ> qr = rows_of(q, b, h);
        const head_rows<TO> outr = rows_of(out, b, h);
        chunk_prefetcher<TQ, TK, TV, TO> pfr(qr, {}, {}, outr, pf, Lpf);
        causal_queries(pl, qr, outr, t0, L, hs, ws, pfr);
        pfr.step(pfr.end);  // whatever is left (short chunks, many features)
      }
      chunk_prefetcher<TQ, TK, TV, TO> pfr({}, kr, vr, {}, pf, Lpf);
      causal_advance(pl, L, hs, ws, pfr);
      pfr.step(pfr.end);
    }
  }
  if (io)
    for (index_t si = 0; si < ns; ++si) {
      const causal_head<Acc>& hs = heads[static_cast<std::size_t>(si)];
      for (index_t h = hs.h; h < hs.h + hs.nq; ++h) {
        if (h % io->group != 0) continue;  // written by the state's first query head
        const index_t sj = io->index(b, h);
        for (index_t f = 0; f < F; ++f) {
          std::copy(hs.s + f * Dvp, hs.s + f * Dvp + Dv, io->s + (sj * F + f) * Dv);
          io->z[sj * F + f] = hs.z[static_cast<std::size_t>(f)];
        }
        if (pl.favor()) io->m[sj] = hs.M;
      }
    }
}

// ---- the non-causal form ----------------------------------------------------------------------------
// Two phases: the key side (S = phi(K)^T V, z and FAVOR+'s key maximum M) per (batch, kv head), then
// the outputs per (batch, query head, block of query rows), so that few kv heads (MQA, GQA with a
// small batch) still spread over every thread. Each output row is computed the same way whatever
// the blocks, so results do not depend on them.

// Non-causal: query rows per output task. Each task starts on cold rows (its first block is not
// prefetched): with 256 rows, 4 plain heads at N 8192 / 65536 ran up to 1.1x slower than before the
// split into phases (Zen 3, 2 threads); with 1024 as fast, and MQA kept its gain.
inline constexpr index_t linear_query_rows = 16 * linear_block;

// The key side of one (batch, kv head) into S (F x Dvp), z (F) and M.
template <class Acc, class TK, class TV>
void noncausal_keys(const linear_plan<Acc>& pl, const head_rows<TK>& kr, const head_rows<TV>& vr, index_t Nk,
                    Acc* S, Acc* z, Acc& M, linear_scratch<Acc>& ws) {
  constexpr index_t C = linear_block, MR = kernels::gemm_mr;
  const index_t F = pl.F, Dv = pl.Dv, Dvp = pl.Dvp;
  Acc* KR = ws.kr;
  Acc* V = ws.sv;
  M = pl.favor() ? -std::numeric_limits<Acc>::infinity() : Acc(0);
  std::fill(S, S + F * Dvp, Acc(0));
  std::fill(z, z + F, Acc(0));
  // Each block prefetches the next block's rows, a few between its GEMM row blocks (64 positions x 2
  // tensors: 8 rows per 4-row block of the state GEMM). Prefetching them all at once, before the
  // block, ran 1.15-1.3x slower on the AVX2 dev VM (elu + 1, D 64, N 8k and 64k, 1 and 2 threads).
  for (index_t t0 = 0; t0 < Nk; t0 += C) {
    const index_t L = std::min(C, Nk - t0);
    chunk_prefetcher<float, TK, TV, float> pfr({}, kr, vr, {}, t0 + C, std::min(C, Nk - t0 - C));
    const Acc r = key_features(pl, kr, t0, L, ws, KR, F, M);
    if (r != Acc(1)) {
      vscale(S, r, F * Dvp);
      vscale(z, r, F);
    }
    if (Dv > 0)
      for (index_t j = 0; j < L; ++j) load_row(V + j * Dvp, vr(t0 + j), vr.inc, Dv);
    for (index_t f0 = 0; f0 < F; f0 += MR) {
      pfr.step(8);
      kernels::gemm_acc(std::min(MR, F - f0), Dvp, L, KR + f0, index_t(1), F, V, Dvp, S + f0 * Dvp, Dvp);
    }
    vadd_rows(z, KR, F, L, F);
    pfr.step(pfr.end);
  }
}

// Output rows [q0, q1) of one query head from its kv head's S, z, M. Each block prefetches the next
// block's q and out rows: 4 per GEMM row block, 1 per output row.
template <class Acc, class TQ, class TO>
void noncausal_queries(const linear_plan<Acc>& pl, const head_rows<TQ>& qr, const head_rows<TO>& outr, index_t q0,
                       index_t q1, const Acc* S, const Acc* z, Acc M, linear_scratch<Acc>& ws) {
  constexpr index_t C = linear_block, MR = kernels::gemm_mr;
  const index_t F = pl.F, Dvp = pl.Dvp, lda = ws.lda;
  Acc* AQ = ws.aq;
  Acc* O = ws.o;
  Acc* stab = ws.stab;
  for (index_t t0 = q0; t0 < q1; t0 += C) {
    const index_t L = std::min(C, q1 - t0);
    chunk_prefetcher<TQ, float, float, TO> pfr(qr, {}, {}, outr, t0 + C, std::min(C, q1 - t0 - C));
    query_features(pl, qr, t0, L, ws, AQ, lda, stab);
    for (index_t r0 = 0; r0 < L; r0 += MR) {
      pfr.step(4);
      kernels::gemm_set(std::min(MR, L - r0), Dvp, F, AQ + r0 * lda, lda, index_t(1), S, Dvp, O + r0 * Dvp, Dvp);
    }
    for (index_t i = 0; i < L; ++i) {
      pfr.step(1);
      finalize_row(pl, O + i * Dvp, vdot(AQ + i * lda, z, F), stab[i] + M, outr(t0 + i), outr.inc);
    }
    pfr.step(pfr.end);
  }
}

// Query heads per causal task: a whole GQA group, so that its heads share one state computation,
// halved (each part computing the state on its own) while there are fewer tasks than threads;
// linear_head_group without GQA. The results do not depend on the split: a head's arithmetic is the
// same whether its state is shared or not.
inline index_t causal_task_heads(const attention_shape& s) {
  index_t heads = std::max(s.group(), linear_head_group);
  while (heads > linear_head_group && s.batch * ceil_div(s.q_heads, heads) < max_threads())
    heads = ceil_div(heads, index_t(2));
  return heads;
}

template <class Acc, class TQ, class TK, class TV, class TO>
void run_linear(const linear_shape& ls, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out, const linear_params& p,
                linear_attention_state<Acc>* st, index_t state_group) {
  const attention_shape& s = ls.s;
  const linear_plan<Acc> pl = make_linear_plan<Acc>(ls, p);
  if (p.causal) {
    const index_t per_task = causal_task_heads(s), groups = ceil_div(s.q_heads, per_task);
    causal_state_io<Acc> io;
    std::vector<Acc> initial;  // the states before the call, when tasks split a state's heads
    if (st) {
      io = {st->s.data(), st->z.data(), st->key_max.data(), st->s.data(), st->z.data(), st->key_max.data(),
            st->heads, state_group};
      if (per_task < state_group) {
        initial.reserve(st->s.size() + st->z.size() + st->key_max.size());
        for (const auto* part : {&st->s, &st->z, &st->key_max})
          initial.insert(initial.end(), part->begin(), part->end());
        io.in_s = initial.data();
        io.in_z = io.in_s + st->s.size();
        io.in_m = io.in_z + st->z.size();
      }
    }
    parallel_for(s.batch * groups, 1, [&](index_t t0, index_t t1) {
      linear_scratch<Acc> ws(pl, linear_chunk);
      std::vector<causal_head<Acc>> heads(static_cast<std::size_t>(per_task));  // storage allocated when used
      for (index_t t = t0; t < t1; ++t) {
        const index_t b = t / groups, h0 = (t % groups) * per_task, nh = std::min(per_task, s.q_heads - h0);
        linear_causal_heads(pl, q, k, v, out, b, h0, nh, s.group(), p.decay, ws, heads, st ? &io : nullptr);
      }
    });
    if (st) st->position += s.q_len;
  } else {
    // Per (batch, kv head): S (F x Dvp, line-aligned), z (F), M.
    const index_t F = pl.F, Dvp = pl.Dvp, kv = s.batch * s.kv_heads;
    constexpr index_t line = 64 / index_t(sizeof(Acc));  // elements per cache line
    const index_t zoff = kernels::pad_to_width(F * Dvp);
    const index_t stride = ceil_div(zoff + std::max<index_t>(F, 1), line) * line;  // each state starts on a line
    std::vector<Acc> states(static_cast<std::size_t>(kv * stride) + line_slack);
    std::vector<Acc> key_max(static_cast<std::size_t>(kv));
    Acc* base = line_aligned(states.data());
    parallel_for(kv, 1, [&](index_t t0, index_t t1) {
      linear_scratch<Acc> ws(pl, linear_block);
      for (index_t t = t0; t < t1; ++t) {
        const index_t b = t / s.kv_heads, hk = t % s.kv_heads;
        Acc* S = base + t * stride;
        Acc& M = key_max[static_cast<std::size_t>(t)];
        noncausal_keys(pl, rows_of(k, b, hk), rows_of(v, b, hk), s.kv_len, S, S + zoff, M, ws);
      }
    });
    const index_t blocks = ceil_div(s.q_len, linear_query_rows);
    parallel_for(s.batch * s.q_heads * blocks, 1, [&](index_t t0, index_t t1) {
      linear_scratch<Acc> ws(pl, linear_block);
      for (index_t t = t0; t < t1; ++t) {
        const index_t blk = t % blocks, h = t / blocks % s.q_heads, b = t / blocks / s.q_heads;
        const index_t state = b * s.kv_heads + h / s.group();
        const Acc* S = base + state * stride;
        const index_t q0 = blk * linear_query_rows, q1 = std::min(s.q_len, q0 + linear_query_rows);
        noncausal_queries(pl, rows_of(q, b, h), rows_of(out, b, h), q0, q1, S, S + zoff,
                          key_max[static_cast<std::size_t>(state)], ws);
      }
    });
  }
}

// ---- recurrent step ---------------------------------------------------------------------------------------

// Columns [d, d + U W) of one pass over a state S (F x Dv, row-major, the state layout) for QN query
// feature rows qf[g]: with Update, first S_f = factor * S_f + kf_f v (the step's new token), then
// num[g] = sum_f qf[g]_f S_f. An entry of num is computed the same way whatever U, QN and Update, so
// query heads that share a state get the bits a copy of it would give them.
template <bool Update, int QN, int U>
inline void state_columns(float* S, const float* kf, const float* v, float factor, const float* const* qf,
                          float* const* num, index_t F, index_t Dv, index_t d) {
  constexpr index_t W = simd::width;
  simd::vec vv[U], acc[QN][U];
  for (int u = 0; u < U; ++u) {
    if constexpr (Update) vv[u] = simd::load(v + d + u * W);
    for (int g = 0; g < QN; ++g) acc[g][u] = simd::vec(0.f);
  }
  const simd::vec fac(factor);
  for (index_t f = 0; f < F; ++f) {
    float* row = S + f * Dv + d;
    simd::vec kv, qv[QN];  // broadcast once per row, not per vector
    if constexpr (Update) kv = simd::vec(kf[f]);
    for (int g = 0; g < QN; ++g) qv[g] = simd::vec(qf[g][f]);
    for (int u = 0; u < U; ++u) {
      simd::vec x = simd::load(row + u * W);
      if constexpr (Update) {
        x = simd::fma(kv, vv[u], x * fac);
        simd::store(row + u * W, x);
      }
      for (int g = 0; g < QN; ++g) acc[g][u] = simd::fma(qv[g], x, acc[g][u]);
    }
  }
  for (int u = 0; u < U; ++u)
    for (int g = 0; g < QN; ++g) simd::store(num[g] + d + u * W, acc[g][u]);
}

// The whole pass: column blocks of U vectors (QN x U accumulators), then single vectors, then the
// scalar columns.
template <bool Update, int QN, class Acc>
inline void state_pass(Acc* S, const Acc* kf, const Acc* v, Acc factor, const Acc* const* qf, Acc* const* num,
                       index_t F, index_t Dv) {
  index_t d = 0;
  if constexpr (std::is_same_v<Acc, float>) {
    constexpr int U = QN == 1 ? 4 : 2;
    constexpr index_t W = simd::width;
    for (; d + U * W <= Dv; d += U * W) state_columns<Update, QN, U>(S, kf, v, factor, qf, num, F, Dv, d);
    for (; d + W <= Dv; d += W) state_columns<Update, QN, 1>(S, kf, v, factor, qf, num, F, Dv, d);
  }
  for (; d < Dv; ++d) {
    Acc acc[QN] = {};
    for (index_t f = 0; f < F; ++f) {
      Acc& x = S[f * Dv + d];
      if constexpr (Update) x = factor * x + kf[f] * v[d];
      for (int g = 0; g < QN; ++g) acc[g] += qf[g][f] * x;
    }
    for (int g = 0; g < QN; ++g) num[g][d] = acc[g];
  }
}

// One token for the G query heads of one state: S_f = factor * S_f + kf_f v, z = factor * z + kf,
// num[g] = qf[g] S, den[g] = qf[g] . z. One pass over S updates it and serves up to 4 heads (the
// next ones read S again, now in cache). G >= 1; qf: G rows with stride ldq; num: G rows with stride
// ldn.
template <class Acc>
inline void recurrent_update(Acc* S, Acc* z, const Acc* kf, const Acc* v, Acc factor, index_t F, index_t Dv,
                             const Acc* qf, index_t ldq, index_t G, Acc* num, index_t ldn, Acc* den) {
  for (index_t f = 0; f < F; ++f) z[f] = factor * z[f] + kf[f];
  for (index_t g = 0; g < G; ++g) den[g] = vdot(qf + g * ldq, z, F);
  constexpr index_t pack = 4;
  for (index_t g0 = 0; g0 < G; g0 += pack) {
    const index_t n = std::min(pack, G - g0);
    const Acc* qp[pack] = {};
    Acc* np[pack] = {};
    for (index_t g = 0; g < n; ++g) {
      qp[g] = qf + (g0 + g) * ldq;
      np[g] = num + (g0 + g) * ldn;
    }
    const auto pass = [&]<int QN>() {
      if (g0 == 0)
        state_pass<true, QN>(S, kf, v, factor, qp, np, F, Dv);
      else
        state_pass<false, QN>(S, kf, v, factor, qp, np, F, Dv);
    };
    switch (n) {
      case 1: pass.template operator()<1>(); break;
      case 2: pass.template operator()<2>(); break;
      case 3: pass.template operator()<3>(); break;
      default: pass.template operator()<4>(); break;
    }
  }
}

// ---- reference helpers ----------------------------------------------------------------------------------

// phi of one row in double, exactly as the definition reads (no stabilization).
template <class T>
void reference_features(const linear_params& p, const tensor_view<T, 4>& x, index_t b, index_t t, index_t head,
                        index_t D, index_t F, double scale, std::vector<double>& row, std::vector<double>& phi) {
  for (index_t d = 0; d < D; ++d) row[static_cast<std::size_t>(d)] = convert<double>(x(b, t, head, d));
  switch (p.phi) {
    case feature_map::identity:
      for (index_t d = 0; d < D; ++d) phi[static_cast<std::size_t>(d)] = row[static_cast<std::size_t>(d)];
      return;
    case feature_map::elu_plus_one:
      for (index_t d = 0; d < D; ++d) {
        const double y = row[static_cast<std::size_t>(d)];
        phi[static_cast<std::size_t>(d)] = y > 0 ? y + 1 : std::isnan(y) ? y : std::exp(y);
      }
      return;
    case feature_map::relu:
      for (index_t d = 0; d < D; ++d) {
        const double y = row[static_cast<std::size_t>(d)];
        phi[static_cast<std::size_t>(d)] = y < 0 ? 0.0 : y;
      }
      return;
    case feature_map::cosine: {
      double sq = 0;
      for (index_t d = 0; d < D; ++d) sq += row[static_cast<std::size_t>(d)] * row[static_cast<std::size_t>(d)];
      const double norm = std::sqrt(sq);
      for (index_t d = 0; d < D; ++d) phi[static_cast<std::size_t>(d)] = norm == 0 ? 0.0 : row[static_cast<std::size_t>(d)] / norm;
      return;
    }
    case feature_map::favor_positive: {
      const double root = std::sqrt(scale);
      double sq = 0;
      for (index_t d = 0; d < D; ++d) {
        row[static_cast<std::size_t>(d)] *= root;
        sq += row[static_cast<std::size_t>(d)] * row[static_cast<std::size_t>(d)];
      }
      for (index_t f = 0; f < F; ++f) {
        double u = 0;
        for (index_t d = 0; d < D; ++d) u += double(p.projection(f, d)) * row[static_cast<std::size_t>(d)];
        phi[static_cast<std::size_t>(f)] = std::exp(u - sq / 2) / std::sqrt(double(F));
      }
      return;
    }
  }
}

}  // namespace detail

// ---- public entry points ------------------------------------------------------------------------------

// The O(Nq * Nk * (F + Dv)) definition above, evaluated in double without any stabilization.
template <class TQ, class TK, class TV, class TO>
void reference_linear_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                                tensor_view<TO, 4> out, const linear_params& p) {
  detail::check_linear_element_types<TQ, TK, TV, TO>();
  const detail::linear_shape ls = detail::validate_linear("reference_linear_attention", q, k, v, out, p);
  const attention_shape& s = ls.s;
  const index_t D = s.head_dim, F = ls.features, Dv = s.value_dim;
  const double scale = detail::effective_scale<double>(p.scale, D);
  parallel_for(s.batch * s.q_heads, 1, [&](index_t t0, index_t t1) {
    std::vector<double> row(static_cast<std::size_t>(D)), phiq(static_cast<std::size_t>(F)),
        phik(static_cast<std::size_t>(s.kv_len * F)), num(static_cast<std::size_t>(Dv));
    std::vector<double> tmp(static_cast<std::size_t>(F));
    for (index_t t = t0; t < t1; ++t) {
      const index_t b = t / s.q_heads, h = t % s.q_heads, hk = h / s.group();
      for (index_t j = 0; j < s.kv_len; ++j) {
        detail::reference_features(p, k, b, j, hk, D, F, scale, row, tmp);
        std::copy(tmp.begin(), tmp.end(), phik.begin() + j * F);
      }
      for (index_t i = 0; i < s.q_len; ++i) {
        detail::reference_features(p, q, b, i, h, D, F, scale, row, phiq);
        std::fill(num.begin(), num.end(), 0.0);
        double den = 0;
        const index_t hi = p.causal ? i + 1 : s.kv_len;
        for (index_t j = 0; j < hi; ++j) {
          double w = 0;
          for (index_t f = 0; f < F; ++f) w += phiq[static_cast<std::size_t>(f)] * phik[static_cast<std::size_t>(j * F + f)];
          if (p.decay) w *= std::pow(double(p.decay[h]), double(i - j));
          den += w;
          for (index_t d = 0; d < Dv; ++d) num[static_cast<std::size_t>(d)] += w * convert<double>(v(b, j, hk, d));
        }
        const double dd = den + double(p.eps);
        for (index_t d = 0; d < Dv; ++d) {
          const double x = num[static_cast<std::size_t>(d)];
          out(b, i, h, d) = static_cast<TO>(!p.normalize ? x : dd == 0 ? 0.0 : x / dd);
        }
      }
    }
  });
}

// Linear attention as defined above: O(N * F * Dv) per head.
template <class TQ, class TK, class TV, class TO>
void linear_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                      const linear_params& p) {
  detail::check_linear_element_types<TQ, TK, TV, TO>();
  const detail::linear_shape ls = detail::validate_linear("linear_attention", q, k, v, out, p);
  using Acc = detail::linear_accum_t<TQ, TK, TV>;
  detail::run_linear<Acc>(ls, q, k, v, out, p, static_cast<linear_attention_state<Acc>*>(nullptr), 1);
}

// Causal linear attention continuing from `state` (positions state.position, ...): the output of the
// sequence given everything appended before, and the state advanced past it (prefill before
// linear_attention_step, or a long sequence processed in pieces). Needs params.causal.
template <class TQ, class TK, class TV, class TO, class Acc>
void linear_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                      const linear_params& p, linear_attention_state<Acc>& state) {
  detail::check_linear_element_types<TQ, TK, TV, TO>();
  const detail::linear_shape ls = detail::validate_linear("linear_attention", q, k, v, out, p);
  const index_t state_group = detail::validate_linear_state("linear_attention", state, ls, p);
  detail::run_linear<Acc>(ls, q, k, v, out, p, &state, state_group);
}

// Appends one token per (batch, head) to `state` and writes its output: q_t, k_t, v_t and out_t are
// (batch, 1, head, dim) views. O(F * Dv) per head whatever the position. A sequence of steps equals
// the causal parallel form (to rounding). Needs params.causal.
template <class TQ, class TK, class TV, class TO, class Acc>
void linear_attention_step(linear_attention_state<Acc>& state, tensor_view<TQ, 4> q_t, tensor_view<TK, 4> k_t,
                           tensor_view<TV, 4> v_t, tensor_view<TO, 4> out_t, const linear_params& p) {
  constexpr std::string_view fn = "linear_attention_step";
  detail::check_linear_element_types<TQ, TK, TV, TO>();
  const detail::linear_shape ls = detail::validate_linear(fn, q_t, k_t, v_t, out_t, p);
  detail::require(q_t.extent(1) == 1, fn, "q_t", "sequence length 1 (one token per step)", q_t.extent(1));
  const index_t G = detail::validate_linear_state(fn, state, ls, p);  // query heads per state
  const attention_shape& s = ls.s;
  const detail::linear_plan<Acc> pl = detail::make_linear_plan<Acc>(ls, p);
  const index_t F = pl.F, Dv = pl.Dv, Hs = state.heads;
  // A step costs about (G + 1) F Dv multiply-adds per state. Chunks of at least ~256K of them, so that
  // a small batch runs serially instead of paying a parallel region per token, as many as the
  // threads (or a multiple) so that none idles. A state's arithmetic does not depend on the chunks.
  const index_t n = s.batch * Hs, threads = max_threads();
  const double work = double(n) * double(F) * double(Dv) * double(G + 1);
  index_t chunks = std::max<index_t>(1, std::min(n, static_cast<index_t>(work / double(index_t(1) << 18))));
  if (chunks > 1) chunks = std::min(n, detail::ceil_div(chunks, threads) * threads);
  const index_t grain = detail::ceil_div(n, chunks);
  parallel_for(n, grain, [&](index_t t0, index_t t1) {
    detail::linear_scratch<Acc> ws(pl, G);
    Acc* qf = ws.aq;  // G x (F + G)
    Acc* kf = ws.kr;  // F
    Acc* vb = ws.sv;  // Dv
    Acc* num = ws.o;  // G x Dvp
    for (index_t t = t0; t < t1; ++t) {
      const index_t b = t / Hs, h0 = t % Hs * G, hk = h0 / s.group();
      Acc* S = state.s.data() + t * F * Dv;
      Acc* z = state.z.data() + t * F;
      Acc M = pl.favor() ? state.key_max[static_cast<std::size_t>(t)] : Acc(0);
      const Acc r = detail::key_features(pl, detail::rows_of(k_t, b, hk), 0, 1, ws, kf, F, M);
      const Acc factor = r * (p.decay ? static_cast<Acc>(p.decay[h0]) : Acc(1));
      if (Dv > 0) detail::load_row(vb, detail::rows_of(v_t, b, hk)(0), v_t.stride(3), Dv);
      if (pl.favor()) state.key_max[static_cast<std::size_t>(t)] = M;
      for (index_t g = 0; g < G; ++g)
        detail::query_features(pl, detail::rows_of(q_t, b, h0 + g), 0, 1, ws, qf + g * ws.lda, ws.lda, ws.stab + g);
      detail::recurrent_update(S, z, kf, vb, factor, F, Dv, qf, ws.lda, G, num, pl.Dvp, ws.den);
      for (index_t g = 0; g < G; ++g)
        detail::finalize_row(pl, num + g * pl.Dvp, ws.den[g], ws.stab[g] + M, detail::rows_of(out_t, b, h0 + g)(0),
                             out_t.stride(3));
    }
  });
  state.position += 1;
}

}  // namespace attnkit
