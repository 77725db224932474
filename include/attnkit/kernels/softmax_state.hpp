// The running online-softmax state of one query row, on top of the scalar algebra of
// online_softmax.hpp (safe_max, merge_lse). Plain scalar C++ marked ATTNKIT_HOST_DEVICE: the CUDA
// kernels keep one per row (per lane), the CPU operators can use it for their scalar paths, and the
// CPU tests exercise it.
//
// Conventions (DESIGN.md): a row that has seen no key (or only -inf logits) has m = -inf, l = 0; its
// output is 0 and its log-sum-exp -inf. NaN logits are not special-cased: they make l NaN, which
// then propagates to the output and the log-sum-exp of that row only. Nothing below evaluates
// (-inf) - (-inf), so an empty row never turns into NaN.
#pragma once

#include <cmath>

#include "attnkit/core/host_device.hpp"
#include "attnkit/kernels/online_softmax.hpp"

namespace attnkit::kernels {

// Running statistics of one row: m is the largest logit seen so far, l the sum of exp(s - m) over
// the keys seen. A kernel that spreads a row over several lanes may keep a partial l per lane (all
// lanes sharing m) and add the partial sums at the end: every update below is linear in l.
template <class A>
struct softmax_state {
  A m = -A(INFINITY);
  A l = A(0);

  // What to subtract from this row's logits before exp: the running max, or 0 while it is -inf.
  ATTNKIT_HOST_DEVICE A offset() const { return safe_max(m); }

  // Folds in a block of logits whose largest value is block_max (-inf for an all-masked block; a
  // NaN block_max is ignored, the NaN logits themselves poison l later). Rescales l and returns the
  // factor by which the caller must multiply its output accumulator for this row (exp(m_old -
  // m_new): 0 while nothing was seen, 1 when the max did not move). Afterwards weight the block's
  // logits with exp(s - offset()) and add() their sum.
  ATTNKIT_HOST_DEVICE A rescale(A block_max) {
    const A m_new = block_max > m ? block_max : m;
    const A alpha = std::exp(m - safe_max(m_new));
    m = m_new;
    l *= alpha;
    return alpha;
  }

  ATTNKIT_HOST_DEVICE void add(A weight_sum) { l += weight_sum; }

  // Factor that turns the accumulated sum_j exp(s_j - offset()) v_j into the softmax output: 1 / l,
  // or 0 for an empty row. (An empty row's output should be written as exactly 0, not as the
  // accumulator times 0, in case a masked value was infinite.)
  ATTNKIT_HOST_DEVICE A output_scale() const { return l == A(0) ? A(0) : A(1) / l; }

  // log(sum_j exp(s_j)) = m + log(l); -inf for an empty row; NaN when l is NaN.
  ATTNKIT_HOST_DEVICE A lse() const { return l == A(0) ? -A(INFINITY) : offset() + std::log(l); }
};

}  // namespace attnkit::kernels
