// attention_params, the shape of a softmax-attention problem, and the checks shared by every
// softmax operator (reference, flash, sparse, block-sparse).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "attnkit/core/error.hpp"
#include "attnkit/core/host_device.hpp"
#include "attnkit/core/tensor_view.hpp"

namespace attnkit {

struct attention_params {
  float scale = 0.f;          // 0 -> 1/sqrt(head_dim)
  bool causal = false;        // bottom-right aligned: query i sees key j iff j <= i + (Nk - Nq)
  index_t window_left = -1;   // -1 unlimited; else also requires j >= i + (Nk - Nq) - window_left
  index_t window_right = -1;  // -1 unlimited; else also requires j <= i + (Nk - Nq) + window_right
  float softcap = 0.f;        // > 0: s = softcap * tanh(s / softcap), applied before masking
  tensor_view<const float, 4> bias{};   // optional additive bias, logical (batch, head, q, k); stride 0 or extent 1 broadcasts
  const float* alibi_slopes = nullptr;  // optional, one per query head: adds -slope * |i + (Nk - Nq) - j|
  const index_t* kv_lengths = nullptr;  // optional, one per batch: keys >= kv_lengths[b] do not exist
                                        // (alignment above then uses kv_lengths[b] as Nk)
};

// Sizes of one softmax-attention call, after validation.
struct attention_shape {
  index_t batch = 0, q_len = 0, kv_len = 0, q_heads = 0, kv_heads = 0, head_dim = 0, value_dim = 0;
  index_t group() const { return kv_heads > 0 ? q_heads / kv_heads : 1; }
};

// The key range a query row may see and the scalar logit transform, shared by every softmax operator
// and by the CUDA kernels (hence no std:: calls that device code lacks).
struct attention_mask {
  bool causal = false;
  index_t window_left = -1, window_right = -1;

  // Keys allowed for query row i given the number of existing keys and the diagonal offset
  // (kv_len - q_len): returns [lo, hi). Causal and window constraints are contiguous ranges.
  ATTNKIT_HOST_DEVICE void key_range(index_t i, index_t kv_len, index_t offset, index_t& lo, index_t& hi) const {
    const index_t diag = i + offset;
    lo = 0;
    hi = kv_len;
    if (causal && diag + 1 < hi) hi = diag + 1;
    if (window_right >= 0 && diag + window_right + 1 < hi) hi = diag + window_right + 1;
    if (window_left >= 0 && diag - window_left > lo) lo = diag - window_left;
    if (hi < lo) hi = lo;
  }
};

namespace detail {

// An output view must not map two logical elements to one address: a stride of 0 on an axis of
// extent > 1 would make several (possibly concurrent) writes land on the same element.
template <class T, std::size_t R>
void require_writable(std::string_view fn, std::string_view arg, const tensor_view<T, R>& v) {
  if (v.empty()) return;
  for (std::size_t a = 0; a < R; ++a)
    if (v.extent(a) > 1 && v.stride(a) == 0)
      fail(fn, arg, concat("a non-zero stride on axis ", a, " (extent ", v.extent(a), "; outputs cannot broadcast)"),
           "stride 0");
}

inline std::string extents_string(const index_t* e, std::size_t n) {
  std::string s = "(";
  for (std::size_t i = 0; i < n; ++i) s += concat(i ? ", " : "", e[i]);
  return s + ")";
}

template <class T, std::size_t R>
void require_extents(std::string_view fn, std::string_view arg, const tensor_view<T, R>& v,
                     const std::array<index_t, R>& want, std::string_view axes) {
  if (v.extents() != want)
    fail(fn, arg, concat("logical extents ", axes, " = ", extents_string(want.data(), R)),
         extents_string(v.extents().data(), R));
}

// The logit scale in the accumulation type A: params.scale, or 1/sqrt(head_dim) when it is 0.
template <class A = float>
inline A effective_scale(float scale, index_t head_dim) {
  if (scale != 0.f) return static_cast<A>(scale);
  return head_dim > 0 ? A(1) / std::sqrt(static_cast<A>(head_dim)) : A(1);
}

// Checks that q and k agree (batch, head_dim, kv heads dividing the query heads) and returns their
// part of the shape (value_dim left 0).
template <class TQ, class TK>
attention_shape validate_qk(std::string_view fn, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k) {
  attention_shape s;
  s.batch = q.extent(0);
  s.q_len = q.extent(1);
  s.q_heads = q.extent(2);
  s.head_dim = q.extent(3);
  s.kv_len = k.extent(1);
  s.kv_heads = k.extent(2);
  require(k.extent(0) == s.batch, fn, "k", text("batch extent ", s.batch, " (as q)"), k.extent(0));
  require(k.extent(3) == s.head_dim, fn, "k", text("head_dim ", s.head_dim, " (as q)"), k.extent(3));
  require(s.q_heads == 0 || s.kv_heads >= 1, fn, "k", "at least one kv head", s.kv_heads);
  require(s.kv_heads == 0 || s.q_heads % s.kv_heads == 0, fn, "k",
          text("a kv head count dividing the query head count ", s.q_heads), s.kv_heads);
  return s;
}

// Checks q/k/v/out/lse/params of a softmax-attention call and returns its shape. Throws before
// anything is written. `lse` may be empty (not requested).
template <class TQ, class TK, class TV, class TO, class TL>
attention_shape validate_attention(std::string_view fn, const tensor_view<TQ, 4>& q,
                                   const tensor_view<TK, 4>& k, const tensor_view<TV, 4>& v,
                                   const tensor_view<TO, 4>& out, const attention_params& p,
                                   const tensor_view<TL, 3>& lse) {
  attention_shape s = validate_qk(fn, q, k);
  s.value_dim = v.extent(3);
  require_extents(fn, "v", v, {s.batch, s.kv_len, s.kv_heads, s.value_dim}, "(batch, seq, head, dim)");
  require_extents(fn, "out", out, {s.batch, s.q_len, s.q_heads, s.value_dim}, "(batch, seq, head, dim)");
  require_writable(fn, "out", out);
  if (!lse.empty() || lse.data() != nullptr) {
    require_extents(fn, "lse", lse, {s.batch, s.q_heads, s.q_len}, "(batch, head, seq)");
    require_writable(fn, "lse", lse);
  }

  require(std::isfinite(p.scale), fn, "params.scale", "a finite value (0 for 1/sqrt(head_dim))", p.scale);
  require(std::isfinite(p.softcap) && p.softcap >= 0.f, fn, "params.softcap", "a finite value >= 0",
          p.softcap);
  require(p.window_left >= -1, fn, "params.window_left", "-1 (unlimited) or a value >= 0", p.window_left);
  require(p.window_right >= -1, fn, "params.window_right", "-1 (unlimited) or a value >= 0",
          p.window_right);
  if (p.bias.data() != nullptr || !p.bias.empty()) {
    const std::array<index_t, 4> want{s.batch, s.q_heads, s.q_len, s.kv_len};
    bool ok = true;
    for (std::size_t a = 0; a < 4; ++a) ok = ok && (p.bias.extent(a) == want[a] || p.bias.extent(a) == 1);
    if (!ok)
      fail(fn, "params.bias",
           concat("logical extents (batch, head, q, k) = ", extents_string(want.data(), 4),
                  " (1 broadcasts)"),
           extents_string(p.bias.extents().data(), 4));
  }
  if (p.alibi_slopes != nullptr)
    for (index_t h = 0; h < s.q_heads; ++h)
      require(std::isfinite(p.alibi_slopes[h]), fn, text("params.alibi_slopes[", h, "]"),
              "a finite slope", p.alibi_slopes[h]);
  if (p.kv_lengths != nullptr)
    for (index_t b = 0; b < s.batch; ++b)
      require(p.kv_lengths[b] >= 0 && p.kv_lengths[b] <= s.kv_len, fn,
              text("params.kv_lengths[", b, "]"), text("a length in [0, ", s.kv_len, "]"),
              p.kv_lengths[b]);
  return s;
}

// The view with every axis whose extent differs from `want` (validated to be 1) turned into a
// stride-0 broadcast, so kernels index it with plain (b, h, i, j).
template <class T, std::size_t R>
tensor_view<T, R> broadcast_to(const tensor_view<T, R>& v, const std::array<index_t, R>& want) {
  if (v.data() == nullptr) return {};
  auto strides = v.strides();
  for (std::size_t a = 0; a < R; ++a)
    if (v.extent(a) != want[a]) strides[a] = 0;
  return tensor_view<T, R>(v.data(), want, strides);
}

}  // namespace detail
}  // namespace attnkit
