// attnkit::cuda::linear_attention's test cases, written once and run through two backends (see
// flash_cases.hpp): the GPU (cuda_backend.cuh) and the CPU emulation of the kernels
// (test_cuda_emulated_linear.cpp). Each case runs reference_linear_attention (double, no
// stabilization) on the same inputs (bf16/f16 inputs: the same rounded values) and compares the
// whole output relative to max |reference| (and identical non-finite values).
//
// A backend provides
//   template <class T, class TO> void linear(const tensor4<T>& q, const tensor4<T>& k, const tensor4<T>& v,
//                                            tensor4<TO>& out, const linear_params& p);
// with p's decay and projection in host memory, as cuda::linear_attention takes them.
#pragma once

#include <sstream>
#include <string>
#include <vector>

#include "flash_cases.hpp"  // seed_of, test_util.hpp

namespace attnkit::test::cuda_cases {

struct linear_spec {
  index_t B = 1, Nq = 1, Nk = 1, Hq = 1, Hkv = 1, D = 16, Dv = -1, features = 0;  // features: FAVOR+ m (0: 2D)
  feature_map phi = feature_map::elu_plus_one;
  bool causal = false, normalize = true, decay = false, positive = false;
  float eps = 1e-6f;
  layout in_layout = layout::bshd, out_layout = layout::bshd;

  index_t dv() const { return Dv < 0 ? D : Dv; }
  std::string name() const {
    std::ostringstream os;
    os << feature_map_name(phi) << " B" << B << " Nq" << Nq << " Nk" << Nk << " Hq" << Hq << " Hkv" << Hkv << " D"
       << D << " Dv" << dv() << " m" << features << (causal ? " causal" : "") << (normalize ? " normalize" : "")
       << (decay ? " decay" : "") << " eps" << eps << " " << layout_name(in_layout) << "->"
       << layout_name(out_layout);
    return os.str();
  }
};

template <class T>
double linear_tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  return 2e-5;  // float accumulation (bf16/f16 inputs are compared on the same rounded values)
}

template <class T>
void fill_between(tensor4<T>& t, std::uint64_t seed, float lo, float hi) {
  auto g = rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  const auto& v = t.view;
  for (index_t b = 0; b < v.extent(0); ++b)
    for (index_t s = 0; s < v.extent(1); ++s)
      for (index_t h = 0; h < v.extent(2); ++h)
        for (index_t d = 0; d < v.extent(3); ++d) v(b, s, h, d) = T(u(g));
}

// The inputs and parameters of one spec; the decays and the projection live here (host memory).
template <class T>
struct linear_problem {
  linear_spec s;
  tensor4<T> q, k, v;
  std::vector<float> decay;
  favor_projection proj;
  linear_params p;
};

template <class T>
linear_problem<T> make_linear_problem(const linear_spec& s) {
  linear_problem<T> r;
  r.s = s;
  const std::uint64_t seed = seed_of(s.name());
  r.q.reset(s.B, s.Nq, s.Hq, s.D, s.in_layout);
  r.k.reset(s.B, s.Nk, s.Hkv, s.D, s.in_layout);
  r.v.reset(s.B, s.Nk, s.Hkv, s.dv(), s.in_layout);
  // identity and cosine have signed weights: normalized, they are only well conditioned for inputs
  // whose dot products are positive (as in test_linear.cpp).
  const float lo = s.positive ? 0.f : -1.f;
  fill_between(r.q, seed + 1, lo, 1.f);
  fill_between(r.k, seed + 2, lo, 1.f);
  fill_between(r.v, seed + 3, -1.f, 1.f);
  r.p.phi = s.phi;
  r.p.causal = s.causal;
  r.p.normalize = s.normalize;
  r.p.eps = s.eps;
  if (s.decay) {
    for (index_t h = 0; h < s.Hq; ++h) r.decay.push_back(h % 4 == 0 ? 1.f : 1.f - 0.3f * float(h % 4) / 3.f);
    r.p.decay = r.decay.data();
  }
  if (s.phi == feature_map::favor_positive) {
    r.proj = make_favor_projection(s.features > 0 ? s.features : 2 * s.D, s.D, seed + 4);
    r.p.projection = r.proj;
  }
  return r;
}

template <class T, class Backend>
void check_linear(Backend& backend, const linear_spec& s) {
  using TO = accum_t<T>;
  INFO(element_name<T>() << " " << s.name());
  const linear_problem<T> pr = make_linear_problem<T>(s);
  tensor4<double> want(s.B, s.Nq, s.Hq, s.dv());
  reference_linear_attention(pr.q.cview(), pr.k.cview(), pr.v.cview(), want.view, pr.p);
  tensor4<TO> got(s.B, s.Nq, s.Hq, s.dv(), s.out_layout);  // NaN-filled: unwritten elements fail
  backend.template linear<T, TO>(pr.q, pr.k, pr.v, got, pr.p);
  const error_stats e = compare(got.view, want.view);
  INFO("max abs error " << e.max_abs << ", max |ref| " << e.max_ref << ", rel " << e.rel());
  CHECK_FALSE(e.mismatched_nonfinite);
  CHECK(e.rel() <= linear_tolerance<T>());
}

inline bool needs_positive(feature_map f, bool normalize) {
  return normalize && (f == feature_map::identity || f == feature_map::cosine);
}

// Every feature map x causal x normalize x decay; head dims 1, 31 (Dv 33, m 48) and 64 (2 chunks of
// columns on the GPU); several chunks and a partial one; GQA 4:2; batch 2.
inline std::vector<linear_spec> linear_map_specs(bool small) {
  std::vector<linear_spec> r;
  for (index_t D : {index_t(1), index_t(31), index_t(64)})
    for (feature_map phi : {feature_map::identity, feature_map::elu_plus_one, feature_map::relu, feature_map::cosine,
                            feature_map::favor_positive})
      for (bool causal : {false, true})
        for (bool normalize : {true, false})
          for (bool decay : {false, true}) {
            if (decay && !causal) continue;
            if (small && D == 64 && (decay || !normalize)) continue;  // emulation time
            linear_spec s;
            s.B = 2, s.Hq = 4, s.Hkv = 2, s.D = D;
            s.Nq = s.Nk = small ? 37 : 150;
            s.Dv = D == 31 ? 33 : (D == 64 && !small ? 80 : D);
            s.features = D == 31 ? 48 : 0;
            s.phi = phi, s.causal = causal, s.normalize = normalize, s.decay = decay;
            s.positive = needs_positive(phi, normalize);
            r.push_back(s);
          }
  return r;
}

// Non-causal Nq != Nk both ways with GQA 6:2 and Dv != D; memory layouts; one-token queries;
// long decayed sequences; eps = 0; empty sequences.
inline std::vector<linear_spec> linear_shape_specs(bool small) {
  std::vector<linear_spec> r;
  for (auto [nq, nk] : {std::pair<index_t, index_t>{37, small ? 70 : 201}, {small ? 50 : 120, 9}, {1, 40}}) {
    for (feature_map phi : {feature_map::elu_plus_one, feature_map::favor_positive}) {
      linear_spec s;
      s.B = 3, s.Nq = nq, s.Nk = nk, s.Hq = 6, s.Hkv = 2, s.D = 24, s.Dv = 40, s.phi = phi;
      r.push_back(s);
    }
  }
  for (layout l : {layout::bhsd, layout::padded, layout::strided})
    for (bool causal : {false, true}) {
      linear_spec s;
      s.B = 2, s.Nq = s.Nk = 33, s.Hq = 2, s.Hkv = 1, s.D = 20, s.Dv = 12, s.causal = causal;
      s.in_layout = l, s.out_layout = l;
      r.push_back(s);
    }
  {
    linear_spec s;  // one token, causal
    s.B = 2, s.Nq = s.Nk = 1, s.Hq = 2, s.Hkv = 2, s.D = 16, s.causal = true, s.decay = true;
    r.push_back(s);
  }
  for (feature_map phi : {feature_map::relu, feature_map::favor_positive}) {
    linear_spec s;  // long decayed sequence: many chunks
    s.B = 1, s.Nq = s.Nk = small ? 200 : 3000, s.Hq = 4, s.Hkv = 1, s.D = 16, s.causal = true, s.decay = true;
    s.phi = phi;
    r.push_back(s);
  }
  {
    linear_spec s;  // eps = 0: a row of relu features that are all 0 has a zero denominator -> 0
    s.B = 1, s.Nq = s.Nk = 20, s.Hq = 2, s.Hkv = 1, s.D = 8, s.phi = feature_map::relu, s.eps = 0.f;
    s.causal = true;
    r.push_back(s);
  }
  for (auto [nq, nk] : {std::pair<index_t, index_t>{5, 0}, {0, 7}}) {  // no keys: out 0; no queries
    linear_spec s;
    s.B = 2, s.Nq = nq, s.Nk = nk, s.Hq = 2, s.Hkv = 1, s.D = 8;
    r.push_back(s);
  }
  return r;
}

template <class T, class Backend>
void run_linear_suite(Backend& backend, bool small) {
  SECTION("every feature map x causal x normalize x decay") {
    for (const linear_spec& s : linear_map_specs(small)) check_linear<T>(backend, s);
  }
  SECTION("shapes, layouts, one token, long sequences, eps 0, empty sequences") {
    for (const linear_spec& s : linear_shape_specs(small)) check_linear<T>(backend, s);
  }
}

// A NaN in v_j reaches causal rows i >= j only; in q_i only row i.
template <class Backend>
void check_linear_nan_containment(Backend& backend) {
  linear_spec s;
  s.B = 1, s.Nq = s.Nk = 40, s.Hq = 1, s.Hkv = 1, s.D = 8, s.causal = true;
  linear_problem<float> pr = make_linear_problem<float>(s);
  pr.v(0, 21, 0, 3) = std::numeric_limits<float>::quiet_NaN();
  pr.q(0, 5, 0, 0) = std::numeric_limits<float>::quiet_NaN();
  tensor4<float> got(1, 40, 1, 8);
  backend.template linear<float, float>(pr.q, pr.k, pr.v, got, pr.p);
  for (index_t i = 0; i < 40; ++i) {
    INFO("row " << i);
    CHECK(std::isnan(got(0, i, 0, 3)) == (i >= 21 || i == 5));
    CHECK(std::isnan(got(0, i, 0, 0)) == (i == 5));
  }
}

// Bad arguments throw the CPU operator's messages under the CUDA name, before anything is written.
template <class Backend>
void check_linear_errors(Backend& backend) {
  linear_spec s;
  s.B = 1, s.Nq = s.Nk = 4, s.Hq = 2, s.Hkv = 1, s.D = 8, s.causal = true;
  linear_problem<float> pr = make_linear_problem<float>(s);
  tensor4<float> out(1, 4, 2, 8);
  const std::vector<float> before = out.buf;
  const float bad_decay[2] = {0.5f, 1.5f};
  linear_params p = pr.p;
  p.decay = bad_decay;
  require_error([&] { backend.template linear<float, float>(pr.q, pr.k, pr.v, out, p); },
                {"cuda::linear_attention", "params.decay[1]", "(0, 1]"});
  tensor4<float> wrong(1, 3, 2, 8);
  require_error([&] { backend.template linear<float, float>(pr.q, pr.k, pr.v, wrong, pr.p); },
                {"cuda::linear_attention", "out"});
  p = pr.p;
  p.phi = feature_map::favor_positive;  // without a projection
  require_error([&] { backend.template linear<float, float>(pr.q, pr.k, pr.v, out, p); },
                {"cuda::linear_attention", "params.projection"});
  tensor4<float> k5(1, 5, 1, 8), v5(1, 5, 1, 8);  // causal needs Nq == Nk
  fill_uniform(k5, 1);
  fill_uniform(v5, 2);
  require_error([&] { backend.template linear<float, float>(pr.q, k5, v5, out, pr.p); },
                {"cuda::linear_attention", "k", "Nq == Nk"});
  // Too many features for a block's shared memory.
  const favor_projection big = make_favor_projection(2000, 8, 3);
  p = pr.p;
  p.phi = feature_map::favor_positive;
  p.projection = big;
  require_error([&] { backend.template linear<float, float>(pr.q, pr.k, pr.v, out, p); },
                {"cuda::linear_attention", "params.projection", "features"});
  CHECK(std::memcmp(out.buf.data(), before.data(), before.size() * sizeof(float)) == 0);
}

}  // namespace attnkit::test::cuda_cases
