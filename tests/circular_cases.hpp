// circular_attention test helpers: random logits, the three modes, and circular_attention run
// against reference_circular_attention on the same values. Shared by test_circular and
// test_differential.
//
// Tolerances. circular_attention computes in float through FFTs whose error is absolute, relative to
// the values' scale: outputs are convex combinations of v (|v| <= 1 here), so errors are measured as
// max |got - reference| over all outputs, required <= 2e-6 (observed: about 1e-7 to 8e-7, growing
// slowly with N). bf16/f16/double inputs are compared against the reference run on the same values
// (converted exactly to double), so the same bound applies.
#pragma once

#include "test_util.hpp"

namespace attnkit::test {

constexpr double circular_tol = 2e-6;

template <class T>
void fill_logits(tensor3<T>& l, std::uint64_t seed, float amplitude) {
  auto g = rng(seed);
  std::uniform_real_distribution<float> u(-amplitude, amplitude);
  for (auto& x : l.buf) x = T(u(g));
}

// Mode 0: non-causal, 1: causal, 2: causal + renormalize.
inline circular_params mode_params(int mode) {
  circular_params p;
  p.causal = mode >= 1;
  p.renormalize = mode == 2;
  return p;
}

inline const char* mode_name(int mode) {
  return mode == 0 ? "non-causal" : mode == 1 ? "causal" : "causal+renormalize";
}

// Runs both operators on (logits, v), circular_attention into an output of element O in memory order
// `out_layout`, and returns the comparison.
template <class O = float, class TL, class TV>
error_stats run_and_compare(const tensor_view<TL, 3>& logits, const tensor_view<TV, 4>& v, const circular_params& p,
                            layout out_layout = layout::bshd) {
  const index_t B = v.extent(0), N = v.extent(1), H = v.extent(2), D = v.extent(3);
  tensor4<O> out(B, N, H, D, out_layout);
  tensor4<double> ref(B, N, H, D);
  circular_attention(logits, v, out.view, p);
  reference_circular_attention(logits, v, ref.view, p);
  return compare(out.view, ref.view);
}

}  // namespace attnkit::test
