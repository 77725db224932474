// Online-softmax state of one query row and the merge of two partial attention results.
// Plain scalar C++ marked ATTNKIT_HOST_DEVICE: the CPU operators and the CUDA kernels use the same
// formulas, so the CPU tests exercise the arithmetic the GPU runs.
//
// Conventions (DESIGN.md): a row that has seen no key (or only -inf logits) has m = -inf, l = 0; its
// output is 0 and its log-sum-exp -inf. NaN logits are not special-cased: they make l NaN, which then
// propagates to the output and the log-sum-exp of that row only. No expression below evaluates
// (-inf) - (-inf), so an empty row never turns into NaN.
#pragma once

#include <cmath>

#include "attnkit/core/host_device.hpp"

namespace attnkit::kernels {

namespace detail {

// exp, log and +infinity for float and double, callable from host and device code alike. On the
// device they map to CUDA's accurate expf/logf/exp/log (not the __expf intrinsics).
ATTNKIT_HOST_DEVICE inline float hd_exp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return std::exp(x);
#endif
}
ATTNKIT_HOST_DEVICE inline double hd_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
ATTNKIT_HOST_DEVICE inline float hd_log(float x) {
#if defined(__CUDA_ARCH__)
  return ::logf(x);
#else
  return std::log(x);
#endif
}
ATTNKIT_HOST_DEVICE inline double hd_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// +infinity without std::numeric_limits, whose constexpr members device code may not call unless
// the consumer passes nvcc's --expt-relaxed-constexpr.
template <class A>
ATTNKIT_HOST_DEVICE constexpr A hd_infinity() {
  if constexpr (sizeof(A) == sizeof(float))
    return __builtin_huge_valf();
  else
    return __builtin_huge_val();
}

}  // namespace detail

// Running softmax statistics of one query row: m is the largest logit seen so far, l the sum of
// exp(s - m) over the keys seen. A kernel that spreads a row over several lanes may keep a partial
// l per lane (all lanes sharing m) and add the partial sums at the end; every update below is
// linear in l, so that is exact.
template <class A>
struct softmax_state {
  A m = -detail::hd_infinity<A>();
  A l = A(0);

  // What to subtract from this row's logits before exp: the running max, or 0 while it is -inf
  // (then every logit so far was -inf and exp(-inf - 0) = 0 is the right weight).
  ATTNKIT_HOST_DEVICE A offset() const { return m == -detail::hd_infinity<A>() ? A(0) : m; }

  // Folds in a block of logits whose largest value is block_max (-inf for an all-masked block;
  // a NaN block_max is ignored, the NaN logits themselves poison l later). Rescales l and returns
  // the factor by which the caller must multiply its output accumulator for this row. After the
  // call, weight the block's logits with exp(s - offset()) and add() their sum.
  ATTNKIT_HOST_DEVICE A rescale(A block_max) {
    const A m_new = block_max > m ? block_max : m;
    const A off_new = m_new == -detail::hd_infinity<A>() ? A(0) : m_new;
    const A alpha = detail::hd_exp(m - off_new);  // m = -inf -> 0; m = m_new -> 1
    m = m_new;
    l *= alpha;
    return alpha;
  }

  ATTNKIT_HOST_DEVICE void add(A weight_sum) { l += weight_sum; }

  // Factor that turns the accumulated sum_j exp(s_j - offset()) v_j into the softmax output:
  // 1 / l, or 0 for an empty row (so its output is exactly 0 whatever the accumulator holds).
  ATTNKIT_HOST_DEVICE A output_scale() const { return l == A(0) ? A(0) : A(1) / l; }

  // log(sum_j exp(s_j)) = m + log(l); -inf for an empty row; NaN when l is NaN.
  ATTNKIT_HOST_DEVICE A lse() const {
    return l == A(0) ? -detail::hd_infinity<A>() : offset() + detail::hd_log(l);
  }
};

// Weights that combine two attention results computed over disjoint key sets a and b:
//   m = max(lse_a, lse_b), w_a = exp(lse_a - m) / (exp(lse_a - m) + exp(lse_b - m)), w_b likewise,
//   lse = m + log(exp(lse_a - m) + exp(lse_b - m)),   o = w_a o_a + w_b o_b.
// A side whose lse is -inf (no allowed key) gets weight exactly 0 and the other side is returned
// unchanged (w = 1, lse equal); both -inf gives weights 0 and lse -inf. A NaN lse makes every
// result NaN.
template <class A>
struct merge_weights {
  A a, b, lse;
};

template <class A>
ATTNKIT_HOST_DEVICE inline merge_weights<A> merge_lse(A lse_a, A lse_b) {
  const A inf = detail::hd_infinity<A>();
  if (lse_a == -inf && lse_b == -inf) return {A(0), A(0), -inf};
  // NaN on either side fails both comparisons below and flows into m, then into everything.
  const A m = lse_a > lse_b ? lse_a : (lse_b >= lse_a ? lse_b : lse_a + lse_b);
  const A ea = detail::hd_exp(lse_a - m), eb = detail::hd_exp(lse_b - m);
  const A sum = ea + eb;  // in [1, 2] unless NaN
  return {ea / sum, eb / sum, m + detail::hd_log(sum)};
}

// One merged output element. A side with weight 0 contributes nothing even if its value is NaN or
// uninitialised (an empty partial result may carry anything in o).
template <class A>
ATTNKIT_HOST_DEVICE inline A merge_value(const merge_weights<A>& w, A o_a, A o_b) {
  return (w.a != A(0) ? w.a * o_a : A(0)) + (w.b != A(0) ? w.b * o_b : A(0));
}

}  // namespace attnkit::kernels
