// The CUDA operators' test cases, written once and run through two backends:
//  - gpu_backend (cuda_backend.cuh): copies to the device, calls attnkit::cuda::*, copies back;
//  - emulated_backend (test_cuda_emulated.cpp): runs the same kernels on host threads through the
//    CPU emulation of the CUDA instructions (tests/cuda/emulation), so the index arithmetic is
//    checked even on machines without a GPU.
// Every case builds random inputs, runs attnkit::reference_attention (double accumulation, double
// outputs) on the CPU and compares: output error relative to the largest |reference output|, lse
// absolute error, and identical non-finite values (0 / -inf rows, NaN).
//
// A backend provides
//   template <class T, class TO> void flash(const problem<T>&, tensor4<TO>& out, tensor3<TO>* lse);
//   template <class TO> void merge(const tensor4<TO>& o_a, const tensor3<TO>& lse_a, const tensor4<TO>& o_b,
//                                  const tensor3<TO>& lse_b, tensor4<TO>& o, tensor3<TO>* lse,
//                                  bool in_place);
// where problem<T> holds host tensors and host-pointer params; the backend moves them where its
// kernels can read them.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace attnkit::test::cuda_cases {

enum class bias_kind { none, full, broadcast, with_neg_inf };

// One flash problem. Dv < 0 means Dv = D.
struct spec {
  index_t B = 1, Nq = 1, Nk = 1, Hq = 1, Hkv = 1, D = 64, Dv = -1;
  layout in_layout = layout::bshd, out_layout = layout::bshd;
  bool causal = false;
  index_t window_left = -1, window_right = -1;
  float scale = 0.f, softcap = 0.f;
  bias_kind bias = bias_kind::none;
  bool alibi = false;
  std::vector<index_t> kv_lengths;  // empty: all Nk
  float amplitude = 1.f;            // q and k uniform in (-amplitude, amplitude)
  double tolerance_factor = 1.0;    // widens the dtype tolerance (huge logits)

  index_t dv() const { return Dv < 0 ? D : Dv; }
  std::string name() const {
    std::ostringstream os;
    os << "B" << B << " Nq" << Nq << " Nk" << Nk << " Hq" << Hq << " Hkv" << Hkv << " D" << D << " Dv" << dv()
       << " " << layout_name(in_layout) << "->" << layout_name(out_layout) << (causal ? " causal" : "")
       << " wl" << window_left << " wr" << window_right << " scale" << scale << " softcap" << softcap
       << " bias" << static_cast<int>(bias) << (alibi ? " alibi" : "") << " kv_lengths" << kv_lengths.size()
       << " amp" << amplitude;
    return os.str();
  }
};

template <class T>
struct problem {
  spec s;
  tensor4<T> q, k, v;
  std::vector<float> bias_buf;
  std::vector<float> slopes;
  std::vector<index_t> lengths;
  attention_params params;  // host pointers (bias view into bias_buf, slopes, lengths)
};

inline std::uint64_t seed_of(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a: stable across runs and machines
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

template <class T>
problem<T> make_problem(const spec& s) {
  problem<T> p;
  p.s = s;
  const std::uint64_t seed = seed_of(s.name());
  p.q.reset(s.B, s.Nq, s.Hq, s.D, s.in_layout);
  p.k.reset(s.B, s.Nk, s.Hkv, s.D, s.in_layout);
  p.v.reset(s.B, s.Nk, s.Hkv, s.dv(), s.in_layout);
  fill_uniform(p.q, seed + 1, s.amplitude);
  fill_uniform(p.k, seed + 2, s.amplitude);
  fill_uniform(p.v, seed + 3);
  p.params.causal = s.causal;
  p.params.window_left = s.window_left;
  p.params.window_right = s.window_right;
  p.params.scale = s.scale;
  p.params.softcap = s.softcap;

  auto g = rng(seed + 4);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  if (s.bias != bias_kind::none) {
    // full / with_neg_inf: (B, Hq, Nq, Nk) in BHQK order; broadcast: (1, 1, Nq, Nk) plus a stride-0
    // key axis would be too uniform, so batch and head broadcast.
    const bool bc = s.bias == bias_kind::broadcast;
    const index_t bB = bc ? 1 : s.B, bH = bc ? 1 : s.Hq;
    p.bias_buf.resize(static_cast<std::size_t>(std::max<index_t>(bB * bH * s.Nq * s.Nk, 1)));
    for (auto& x : p.bias_buf) x = u(g);
    if (s.bias == bias_kind::with_neg_inf) {
      // Every 5th logit -inf, and query row 0 of every head entirely -inf (an empty row).
      for (std::size_t i = 0; i < p.bias_buf.size(); i += 5)
        p.bias_buf[i] = -std::numeric_limits<float>::infinity();
      for (index_t b = 0; b < bB; ++b)
        for (index_t h = 0; h < bH; ++h)
          for (index_t j = 0; j < s.Nk; ++j)
            p.bias_buf[static_cast<std::size_t>(((b * bH + h) * s.Nq + 0) * s.Nk + j)] =
                -std::numeric_limits<float>::infinity();
    }
    p.params.bias = tensor_view<const float, 4>(p.bias_buf.data(), {bB, bH, s.Nq, s.Nk},
                                                {bH * s.Nq * s.Nk, s.Nq * s.Nk, s.Nk, 1});
  }
  if (s.alibi) {
    for (index_t h = 0; h < s.Hq; ++h) p.slopes.push_back(std::pow(2.f, -8.f * float(h + 1) / float(s.Hq)));
    p.params.alibi_slopes = p.slopes.data();
  }
  if (!s.kv_lengths.empty()) {
    p.lengths = s.kv_lengths;
    p.params.kv_lengths = p.lengths.data();
  }
  return p;
}

struct tolerance {
  double out_rel, lse_abs;
};

template <class T>
tolerance tolerance_for() {
  if constexpr (std::is_same_v<T, double>)
    return {1e-10, 1e-10};
  else if constexpr (std::is_same_v<T, float>)
    return {1e-4, 1e-4};
  else if constexpr (std::is_same_v<T, f16>)
    return {5e-3, 1e-3};  // P rounded to f16 before P V
  else
    return {2e-2, 1e-3};  // bf16: P rounded to bf16
}

// Runs one problem through the backend and checks out and lse against the reference.
template <class T, class Backend>
void check_flash(Backend& backend, const spec& s) {
  using TO = accum_t<T>;
  INFO(element_name<T>() << " " << s.name());
  const problem<T> p = make_problem<T>(s);
  tensor4<double> want(s.B, s.Nq, s.Hq, s.dv());
  tensor3<double> want_lse(s.B, s.Hq, s.Nq);
  reference_attention(p.q.cview(), p.k.cview(), p.v.cview(), want.view, p.params, want_lse.view);

  tensor4<TO> got(s.B, s.Nq, s.Hq, s.dv(), s.out_layout);  // NaN-filled: unwritten elements fail
  tensor3<TO> got_lse(s.B, s.Hq, s.Nq);
  backend.template flash<T, TO>(p, got, &got_lse);

  const tolerance tol = tolerance_for<T>();
  const error_stats e = compare(got.view, want.view);
  INFO("out: max abs error " << e.max_abs << ", max |ref| " << e.max_ref << ", rel " << e.rel());
  CHECK_FALSE(e.mismatched_nonfinite);
  CHECK(e.rel() <= tol.out_rel * s.tolerance_factor);
  const double lse_err = lse_abs_error(got_lse.view, want_lse.view);
  INFO("lse: max abs error " << lse_err);
  CHECK(lse_err <= tol.lse_abs * s.tolerance_factor);

  // Without lse the output is the same.
  tensor4<TO> got2(s.B, s.Nq, s.Hq, s.dv(), s.out_layout);
  backend.template flash<T, TO>(p, got2, nullptr);
  CHECK(compare(got2.view, got.view).max_abs == 0);
}

// ---- case lists -------------------------------------------------------------------------------------

// Head dims of every bucket plus odd ones that run in the next bucket with a zero-filled tail,
// Nq != Nk both ways, causal and not, GQA.
inline std::vector<spec> head_dim_specs(bool small) {
  std::vector<spec> r;
  const index_t dims[] = {64, 96, 128, 256, 33, 80, 8};
  for (index_t D : dims)
    for (bool causal : {false, true}) {
      spec s;
      s.B = 2;
      s.Nq = small ? 37 : 77;
      s.Nk = small ? 70 : 131;
      s.Hq = 4;
      s.Hkv = 2;
      s.D = D;
      s.causal = causal;
      r.push_back(s);
    }
  spec dv;  // value dim different from the key dim
  dv.B = 1, dv.Nq = 20, dv.Nk = 50, dv.Hq = 2, dv.Hkv = 1, dv.D = 64, dv.Dv = 40;
  r.push_back(dv);
  dv.D = 40, dv.Dv = 100;
  r.push_back(dv);
  return r;
}

// Nq > Nk and Nq < Nk under bottom-right causal alignment (rows before the diagonal are empty),
// and memory layouts: BHSD, padded strides, a dim stride of 2 (scalar load path).
inline std::vector<spec> shape_specs(bool small) {
  std::vector<spec> r;
  for (auto [nq, nk] :
       {std::pair<index_t, index_t>{small ? 90 : 150, 40}, {40, small ? 90 : 150}, {1, 1}, {3, 200}})
    for (bool causal : {false, true}) {
      spec s;
      s.B = 2, s.Nq = nq, s.Nk = nk, s.Hq = 2, s.Hkv = 2, s.D = 64, s.causal = causal;
      r.push_back(s);
    }
  for (auto [nq, nk] : {std::pair<index_t, index_t>{5, 0}, {0, 10}}) {  // no keys: 0 and -inf; no queries
    spec s;
    s.B = 2, s.Nq = nq, s.Nk = nk, s.Hq = 2, s.Hkv = 1, s.D = 64;
    r.push_back(s);
  }
  for (layout l : {layout::bhsd, layout::padded, layout::strided}) {
    spec s;
    s.B = 2, s.Nq = 33, s.Nk = 45, s.Hq = 4, s.Hkv = 1, s.D = 64, s.in_layout = l, s.out_layout = l;
    r.push_back(s);
    s.D = 80;
    r.push_back(s);
  }
  return r;
}

// Grouped-query ratios 1, 4, 8 and multi-query.
inline std::vector<spec> gqa_specs(bool small) {
  std::vector<spec> r;
  for (auto [hq, hkv] : {std::pair<index_t, index_t>{4, 4}, {8, 2}, {8, 1}, {16, 2}}) {
    spec s;
    s.B = 2, s.Nq = small ? 12 : 40, s.Nk = small ? 40 : 100, s.Hq = hq, s.Hkv = hkv, s.D = 64,
    s.causal = true;
    r.push_back(s);
  }
  return r;
}

// Every mask option alone and combined, softcap, scale, bias (full, broadcast, -inf entries and an
// entirely -inf row), ALiBi, kv_lengths (including 0), fully masked rows, huge logits.
inline std::vector<spec> mask_specs(bool small) {
  std::vector<spec> r;
  spec base;
  base.B = 2, base.Nq = small ? 40 : 96, base.Nk = small ? 72 : 160, base.Hq = 4, base.Hkv = 2, base.D = 64;
  auto add = [&](auto&& edit) {
    spec s = base;
    edit(s);
    r.push_back(s);
  };
  add([](spec& s) { s.causal = true; });
  add([](spec& s) { s.window_left = 5; });
  add([](spec& s) { s.window_right = 3; });
  add([](spec& s) { s.window_left = 9, s.window_right = 0; });
  add([](spec& s) { s.causal = true, s.window_left = 17; });
  add([](spec& s) { s.window_left = 0, s.window_right = 0; });    // only the diagonal key
  add([](spec& s) { s.Nq = 60, s.Nk = 20, s.window_left = 2; });  // rows whose window lies past the keys
  add([](spec& s) { s.scale = 0.3f; });
  add([](spec& s) { s.softcap = 2.5f, s.scale = 1.f, s.amplitude = 2.f; });
  add([](spec& s) { s.bias = bias_kind::full; });
  add([](spec& s) { s.bias = bias_kind::broadcast; });
  add([](spec& s) { s.bias = bias_kind::with_neg_inf, s.causal = true; });
  add([](spec& s) { s.alibi = true; });
  add([](spec& s) { s.alibi = true, s.causal = true; });
  add([&](spec& s) { s.kv_lengths = {base.Nk - 9, 0}; });
  add([&](spec& s) { s.kv_lengths = {5, base.Nk}, s.causal = true; });
  add([&](spec& s) {
    s.causal = true, s.window_left = 11, s.window_right = 2, s.softcap = 5.f, s.bias = bias_kind::full;
    s.alibi = true, s.kv_lengths = {base.Nk - 30, base.Nk / 2};
  });
  add([](spec& s) { s.amplitude = 60.f, s.D = 64, s.tolerance_factor = 30; });  // logits ~ +-1e4
  return r;
}

// Decode: few query rows, long keys, GQA (the split-KV path), with different kv_lengths per batch.
inline std::vector<spec> decode_specs(bool small) {
  std::vector<spec> r;
  const index_t nk = small ? 1300 : 40000;
  for (index_t nq : {1, 4}) {
    spec s;
    s.B = 3, s.Nq = nq, s.Nk = nk, s.Hq = 8, s.Hkv = 2, s.D = 128, s.causal = true;
    s.kv_lengths = {nk, nk / 3 + 7, 0};
    r.push_back(s);
  }
  spec w;  // sliding window in a long cache
  w.B = 1, w.Nq = 1, w.Nk = nk, w.Hq = 4, w.Hkv = 1, w.D = 64, w.causal = true, w.window_left = 700;
  r.push_back(w);
  spec d;  // a bucket with few rows per block but head dim 256
  d.B = 1, d.Nq = 1, d.Nk = small ? 900 : 5000, d.Hq = 4, d.Hkv = 4, d.D = 256;
  r.push_back(d);
  return r;
}

// Split the keys of a non-causal problem in two, run each part (lse), merge: equals the whole.
// Also checks -inf sides and in-place merging.
template <class T, class Backend>
void check_merge(Backend& backend, index_t Nk_a, bool in_place) {
  using TO = accum_t<T>;
  spec s;
  s.B = 2, s.Nq = 9, s.Nk = Nk_a + 57, s.Hq = 4, s.Hkv = 2, s.D = 64, s.bias = bias_kind::full;
  INFO(element_name<T>() << " merge Nk_a " << Nk_a << (in_place ? " in place" : ""));
  problem<T> whole = make_problem<T>(s);
  auto part = [&](index_t j0, index_t j1) {
    problem<T> p = make_problem<T>(s);
    p.k.view = p.k.view.slice(1, j0, j1);
    p.v.view = p.v.view.slice(1, j0, j1);
    p.params.bias = p.params.bias.slice(3, j0, j1);
    p.s.Nk = j1 - j0;
    return p;
  };
  const problem<T> pa = part(0, Nk_a), pb = part(Nk_a, s.Nk);
  tensor4<TO> oa(s.B, s.Nq, s.Hq, s.D), ob(s.B, s.Nq, s.Hq, s.D), o(s.B, s.Nq, s.Hq, s.D),
      ow(s.B, s.Nq, s.Hq, s.D);
  tensor3<TO> la(s.B, s.Hq, s.Nq), lb(s.B, s.Hq, s.Nq), l(s.B, s.Hq, s.Nq), lw(s.B, s.Hq, s.Nq);
  backend.template flash<T, TO>(pa, oa, &la);
  backend.template flash<T, TO>(pb, ob, &lb);
  backend.template flash<T, TO>(whole, ow, &lw);
  if (in_place)
    backend.template merge<TO>(oa, la, ob, lb, oa, &la, true);
  else
    backend.template merge<TO>(oa, la, ob, lb, o, &l, false);
  const tensor4<TO>& merged = in_place ? oa : o;
  const tensor3<TO>& merged_lse = in_place ? la : l;
  const tolerance tol = tolerance_for<T>();
  const error_stats e = compare(merged.view, ow.view);
  INFO("merged vs whole: rel " << e.rel());
  CHECK_FALSE(e.mismatched_nonfinite);
  CHECK(e.rel() <= tol.out_rel);
  CHECK(lse_abs_error(merged_lse.view, lw.view) <= tol.lse_abs);
}

// Merging with an empty side returns the other side exactly; two empty sides give 0 and -inf.
template <class Backend>
void check_merge_empty_sides(Backend& backend) {
  const index_t B = 1, S = 3, H = 2, D = 5;
  const float inf = std::numeric_limits<float>::infinity();
  tensor4<float> oa(B, S, H, D), ob(B, S, H, D), o(B, S, H, D);
  tensor3<float> la(B, H, S), lb(B, H, S), l(B, H, S);
  fill_uniform(oa, 1);
  fill_uniform(ob, 2);
  for (index_t h = 0; h < H; ++h)
    for (index_t s = 0; s < S; ++s) {
      la.view(0, h, s) = s == 0 ? -inf : 0.5f * float(s);  // s = 0: side a empty -> o_b, lse_b
      lb.view(0, h, s) = s == 0 ? 1.25f : -inf;            // s > 0: side b empty -> o_a, lse_a
    }
  la.view(0, 1, 2) = -inf;  // head 1, s = 2: both empty -> 0, -inf
  backend.template merge<float>(oa, la, ob, lb, o, &l, false);
  for (index_t h = 0; h < H; ++h)
    for (index_t s = 0; s < S; ++s) {
      const bool both = h == 1 && s == 2;
      for (index_t d = 0; d < D; ++d) {
        const float want = both ? 0.f : (s == 0 ? ob(0, s, h, d) : oa(0, s, h, d));
        CHECK(o(0, s, h, d) == want);
      }
      const float want_l = both ? -inf : (s == 0 ? lb.view(0, h, s) : la.view(0, h, s));
      CHECK(l.view(0, h, s) == want_l);
    }
}

// Every flash case list for element type T, as Catch2 sections.
template <class T, class Backend>
void run_flash_suite(Backend& backend, bool small) {
  SECTION("head dims 64/96/128/256 and odd ones, value dim != head dim") {
    for (const spec& s : head_dim_specs(small)) check_flash<T>(backend, s);
  }
  SECTION("Nq != Nk both ways, layouts and strides") {
    for (const spec& s : shape_specs(small)) check_flash<T>(backend, s);
  }
  SECTION("grouped-query and multi-query heads") {
    for (const spec& s : gqa_specs(small)) check_flash<T>(backend, s);
  }
  SECTION("every mask option, bias, ALiBi, softcap, kv_lengths, empty rows, huge logits") {
    for (const spec& s : mask_specs(small)) check_flash<T>(backend, s);
  }
  SECTION("decode: Nq = 1 and 4 with long keys (split-KV)") {
    for (const spec& s : decode_specs(small)) check_flash<T>(backend, s);
  }
  SECTION("split the keys in two, merge: equals the whole") {
    check_merge<T>(backend, 70, false);
    check_merge<T>(backend, 64, true);
  }
}

}  // namespace attnkit::test::cuda_cases
