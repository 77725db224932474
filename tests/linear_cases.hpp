// Linear-attention test helpers: inputs drawn the way the feature maps need them, and
// linear_attention run against reference_linear_attention on the same (rounded) inputs. Shared by
// test_linear and test_differential.
//
// Tolerances: max |fast - reference| / max |reference| over the whole output. float accumulation:
// 1e-5 (measured up to 2e-6; normalized maps sum non-negative terms, and the identity/cosine
// normalized cases are fed inputs whose sums do not cancel). bf16/f16 inputs are compared with the
// reference run on the same rounded values, so the same float tolerance applies. double: 1e-12.
#pragma once

#include "test_util.hpp"

namespace attnkit::test {

constexpr double linear_tol_float = 1e-5;
constexpr double linear_tol_double = 1e-12;

inline constexpr feature_map all_feature_maps[] = {feature_map::identity, feature_map::elu_plus_one, feature_map::relu,
                                                   feature_map::cosine, feature_map::favor_positive};

// identity and cosine have signed weights: their normalized forms are only well conditioned for
// inputs whose dot products are positive, so those cases draw q and k from (0, 1).
inline bool needs_positive(feature_map f, bool normalize) {
  return normalize && (f == feature_map::identity || f == feature_map::cosine);
}

template <class T>
void fill_range(tensor4<T>& t, std::uint64_t seed, float lo, float hi) {
  auto g = rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  const auto& v = t.view;
  for (index_t b = 0; b < v.extent(0); ++b)
    for (index_t s = 0; s < v.extent(1); ++s)
      for (index_t h = 0; h < v.extent(2); ++h)
        for (index_t d = 0; d < v.extent(3); ++d) v(b, s, h, d) = T(u(g));
}

// q and k uniform in (-1, 1), or (0, 1) when `positive`; v uniform in (-1, 1).
template <class T = float>
struct qkv {
  tensor4<T> q, k, v;
  qkv(index_t B, index_t Nq, index_t Nk, index_t Hq, index_t Hkv, index_t D, index_t Dv, std::uint64_t seed,
      bool positive = false, layout l = layout::bshd)
      : q(B, Nq, Hq, D, l), k(B, Nk, Hkv, D, l), v(B, Nk, Hkv, Dv, l) {
    const float lo = positive ? 0.f : -1.f;
    fill_range(q, seed, lo, 1.f);
    fill_range(k, seed + 1, lo, 1.f);
    fill_range(v, seed + 2, -1.f, 1.f);
  }
};

// Runs linear_attention (output element O, memory order `out_layout`) and the reference on the same
// inputs; returns the error statistics.
template <class O = float, class TQ, class TK, class TV>
error_stats against_reference(const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k, const tensor_view<TV, 4>& v,
                              const linear_params& p, layout out_layout = layout::bshd) {
  const index_t B = q.extent(0), Nq = q.extent(1), Hq = q.extent(2), Dv = v.extent(3);
  tensor4<O> out(B, Nq, Hq, Dv, out_layout);
  tensor4<double> ref(B, Nq, Hq, Dv);
  linear_attention(q, k, v, out.view, p);
  reference_linear_attention(q, k, v, ref.view, p);
  return compare(out.view, ref.view);
}

inline linear_params make_linear_params(feature_map phi, bool causal, bool normalize, const float* decay,
                                        const favor_projection* proj) {
  linear_params p;
  p.phi = phi;
  p.causal = causal;
  p.normalize = normalize;
  p.decay = decay;
  if (phi == feature_map::favor_positive) p.projection = *proj;
  return p;
}

}  // namespace attnkit::test
