// reference_attention: softmax attention written exactly as DESIGN.md defines it, in double.
// It is the oracle every fast softmax operator is tested against; it favours clarity over speed.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attnkit/core/attention_params.hpp"
#include "attnkit/core/parallel.hpp"

namespace attnkit {

namespace detail {

template <class TQ, class TK, class TV, class TO, class TL>
void check_element_types() {
  static_assert(is_input_element_v<std::remove_const_t<TQ>> && is_input_element_v<std::remove_const_t<TK>> &&
                    is_input_element_v<std::remove_const_t<TV>>,
                "q, k, v elements must be float, double, attnkit::bf16 or attnkit::f16");
  static_assert(is_output_element_v<TO> && is_output_element_v<TL>,
                "out and lse elements must be (non-const) float or double");
}

}  // namespace detail

// For every (b, i, h): with offset = L_b - Nq (L_b = kv_lengths[b] or Nk), the allowed keys are the
// j < L_b that pass the causal and window tests of attention_params, the logits are
//   s_j = softcap(scale * q_i . k_j) + bias(b, h, i, j) - slope_h * |i + offset - j|,
// out_i = sum_j softmax(s)_j v_j and lse_i = log(sum_j exp(s_j)) over the allowed keys. A row with no
// allowed key (or only -inf logits) gets out = 0 and lse = -inf.
template <class TQ, class TK, class TV, class TO, class TL = TO>
void reference_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v,
                         tensor_view<TO, 4> out, const attention_params& p = {},
                         tensor_view<TL, 3> lse = {}) {
  detail::check_element_types<TQ, TK, TV, TO, TL>();
  const attention_shape s = detail::validate_attention("reference_attention", q, k, v, out, p, lse);
  const auto bias = detail::broadcast_to(p.bias, {s.batch, s.q_heads, s.q_len, s.kv_len});
  const double scale = detail::effective_scale<double>(p.scale, s.head_dim);
  const attention_mask mask{p.causal, p.window_left, p.window_right};
  const double inf = std::numeric_limits<double>::infinity();
  const index_t rows = s.batch * s.q_heads * s.q_len;

  parallel_for(rows, 16, [&](index_t r0, index_t r1) {
    std::vector<double> logit(static_cast<std::size_t>(s.kv_len));
    std::vector<double> acc(static_cast<std::size_t>(s.value_dim));
    for (index_t r = r0; r < r1; ++r) {
      const index_t i = r % s.q_len, h = (r / s.q_len) % s.q_heads, b = r / (s.q_len * s.q_heads);
      const index_t hk = h / s.group();
      const index_t len = p.kv_lengths ? p.kv_lengths[b] : s.kv_len;
      const index_t offset = len - s.q_len;
      index_t lo = 0, hi = 0;
      mask.key_range(i, len, offset, lo, hi);

      double m = -inf;
      bool nan_seen = false;
      for (index_t j = lo; j < hi; ++j) {
        double dotp = 0;
        for (index_t d = 0; d < s.head_dim; ++d)
          dotp += convert<double>(q(b, i, h, d)) * convert<double>(k(b, j, hk, d));
        double x = scale * dotp;
        if (p.softcap > 0.f) x = p.softcap * std::tanh(x / p.softcap);
        if (bias.data()) x += bias(b, h, i, j);
        if (p.alibi_slopes) x -= p.alibi_slopes[h] * std::abs(static_cast<double>(i + offset - j));
        logit[j] = x;
        if (x > m) m = x;
        if (std::isnan(x)) nan_seen = true;
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      double l = 0;
      if (m > -inf) {
        for (index_t j = lo; j < hi; ++j) {
          const double w = std::exp(logit[j] - m);
          l += w;
          for (index_t d = 0; d < s.value_dim; ++d) acc[d] += w * convert<double>(v(b, j, hk, d));
        }
      }
      const double nan = std::numeric_limits<double>::quiet_NaN();
      const bool empty_row = m == -inf && !nan_seen;
      for (index_t d = 0; d < s.value_dim; ++d)
        out(b, i, h, d) = static_cast<TO>(nan_seen ? nan : empty_row ? 0.0 : acc[d] / l);
      if (lse.data()) lse(b, h, i) = static_cast<TL>(nan_seen ? nan : empty_row ? -inf : m + std::log(l));
    }
  });
}

}  // namespace attnkit
