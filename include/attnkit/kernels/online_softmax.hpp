// The scalar algebra of online softmax: a partial result over a subset of keys is the state
// {o, m, l} (normalised output, running max, running sum of exp(s - m)), summarised by its
// log-sum-exp m + log(l). Two states over disjoint key sets merge associatively. Shared by the CPU
// operators and the CUDA kernels (ATTNKIT_HOST_DEVICE), so the CPU tests exercise it.
#pragma once

#include <cmath>

#include "attnkit/core/host_device.hpp"

namespace attnkit::kernels {

// The value to subtract before exponentiating logits whose maximum is m: m itself, or 0 when every
// logit is -inf (so exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN).
template <class A>
ATTNKIT_HOST_DEVICE inline A safe_max(A m) {
  return m == -INFINITY ? A(0) : m;
}

// Weights of two partial results with log-sum-exps lse_a, lse_b in their merge:
// w_a = exp(lse_a - M) / (exp(lse_a - M) + exp(lse_b - M)), M = max(lse_a, lse_b), likewise w_b,
// and the merged lse. Both -inf: weights 0 and lse -inf (the row saw no key). A NaN lse propagates.
template <class A>
struct merge_weights {
  A w_a, w_b, lse;
};

template <class A>
ATTNKIT_HOST_DEVICE inline merge_weights<A> merge_lse(A lse_a, A lse_b) {
  if (lse_a != lse_a || lse_b != lse_b) {  // NaN on either side
    const A nan = lse_a != lse_a ? lse_a : lse_b;
    return {nan, nan, nan};
  }
  const A m = lse_a > lse_b ? lse_a : lse_b;
  if (m == -INFINITY) return {A(0), A(0), -INFINITY};
  const A ea = std::exp(lse_a - m), eb = std::exp(lse_b - m);
  const A sum = ea + eb;
  return {ea / sum, eb / sum, m + std::log(sum)};
}

}  // namespace attnkit::kernels
