// A softmax-attention test case run through an operator and through reference_attention on the
// same (rounded) inputs in double precision. Shared by the flash, sparse and block-sparse tests.
#pragma once

#include "test_util.hpp"

namespace attnkit::test {

struct attn_case {
  index_t B = 1, Nq = 8, Nk = 8, Hq = 1, Hkv = 1, D = 16, Dv = -1;  // Dv -1: same as D
  attention_params p{};
  layout lay = layout::bshd;
  float q_amp = 1.f, k_amp = 1.f, v_amp = 1.f;
  float tiny = 0.f;  // > 0: every third element of q, k and v is also multiplied by it (1e-39f: subnormals among normals)
  std::uint64_t seed = 1;
  std::vector<float> bias_data{};   // when non-empty, p.bias is built over it with `bias_extents`
  std::array<index_t, 4> bias_extents{};
  std::vector<float> slopes{};
  std::vector<index_t> lengths{};
  index_t dv() const { return Dv < 0 ? D : Dv; }
};

// Copies of one base case, each with an edit applied: the option tables of the operator tests.
struct case_table {
  attn_case base;
  std::vector<attn_case> cases{};
  template <class Edit>
  void add(Edit&& edit) {
    attn_case c = base;
    edit(c);
    cases.push_back(std::move(c));
  }
};

inline std::string describe(const attn_case& c) {
  return detail::concat("B=", c.B, " Nq=", c.Nq, " Nk=", c.Nk, " Hq=", c.Hq, " Hkv=", c.Hkv, " D=", c.D, " Dv=", c.dv(),
                        " causal=", c.p.causal, " wl=", c.p.window_left, " wr=", c.p.window_right,
                        " softcap=", c.p.softcap, " bias=", !c.bias_data.empty(), " alibi=", !c.slopes.empty(),
                        " kv_lengths=", !c.lengths.empty(), " layout=", layout_name(c.lay), " seed=", c.seed);
}

struct attn_result {
  error_stats out;
  // lse error relative to its magnitude: |lse - ref| / max(1, max |ref|). Logits are formed in
  // float, so their rounding error (and the lse's) grows with their size.
  double lse_err = 0;
};

// Allowed-pair predicate of a plain softmax operator: every pair.
struct allow_all {
  bool operator()(index_t, index_t, index_t, index_t) const { return true; }
};

// Runs op(q, k, v, out, params, lse) with q/k/v of element T and out/lse of element O, and the
// reference on double copies of the same inputs. For operators that restrict the allowed keys
// (sparse, block-sparse), `allowed(b, h, i, j)` false adds -inf to the reference's bias there (on top
// of the case's own bias, expanded to full (batch, head, q, k) extents).
template <class T, class O = float, class Op, class Allowed = allow_all>
attn_result run_against_reference(attn_case c, Op&& op, Allowed&& allowed = {}) {
  tensor4<T> q(c.B, c.Nq, c.Hq, c.D, c.lay), k(c.B, c.Nk, c.Hkv, c.D, c.lay), v(c.B, c.Nk, c.Hkv, c.dv(), c.lay);
  tensor4<O> out(c.B, c.Nq, c.Hq, c.dv(), c.lay);
  fill_uniform(q, c.seed * 3 + 1, c.q_amp);
  fill_uniform(k, c.seed * 3 + 2, c.k_amp);
  fill_uniform(v, c.seed * 3 + 3, c.v_amp);
  if (c.tiny > 0) {
    scale_every(q, 3, c.tiny);
    scale_every(k, 3, c.tiny);
    scale_every(v, 3, c.tiny);
  }
  if (!c.bias_data.empty()) {
    const auto& e = c.bias_extents;
    c.p.bias = tensor_view<const float, 4>(c.bias_data.data(), e, {e[1] * e[2] * e[3], e[2] * e[3], e[3], 1});
  }
  if (!c.slopes.empty()) c.p.alibi_slopes = c.slopes.data();
  if (!c.lengths.empty()) c.p.kv_lengths = c.lengths.data();
  tensor3<O> lse(c.B, c.Hq, c.Nq);
  op(q.view, k.view, v.view, out.view, c.p, lse.view);

  attention_params rp = c.p;
  std::vector<float> full;
  if constexpr (!std::is_same_v<std::decay_t<Allowed>, allow_all>) {
    full.resize(static_cast<std::size_t>(std::max<index_t>(c.B * c.Hq * c.Nq * c.Nk, 1)));
    const auto user = detail::broadcast_to(c.p.bias, {c.B, c.Hq, c.Nq, c.Nk});
    const float ninf = -std::numeric_limits<float>::infinity();
    for (index_t b = 0; b < c.B; ++b)
      for (index_t h = 0; h < c.Hq; ++h)
        for (index_t i = 0; i < c.Nq; ++i)
          for (index_t j = 0; j < c.Nk; ++j) {
            const float u = user.data() ? user(b, h, i, j) : 0.f;
            full[std::size_t(((b * c.Hq + h) * c.Nq + i) * c.Nk + j)] = allowed(b, h, i, j) ? u : ninf;
          }
    rp.bias = tensor_view<const float, 4>(full.data(), {c.B, c.Hq, c.Nq, c.Nk},
                                          {c.Hq * c.Nq * c.Nk, c.Nq * c.Nk, c.Nk, 1});
  }
  const auto qd = to_double(q.view), kd = to_double(k.view), vd = to_double(v.view);
  tensor4<double> ref(c.B, c.Nq, c.Hq, c.dv());
  tensor3<double> ref_lse(c.B, c.Hq, c.Nq);
  reference_attention(qd.view, kd.view, vd.view, ref.view, rp, ref_lse.view);
  attn_result r;
  r.out = compare(out.view, ref.view);
  double lse_scale = 1;
  for (double x : ref_lse.buf)
    if (std::isfinite(x)) lse_scale = std::max(lse_scale, std::abs(x));
  r.lse_err = lse_abs_error(lse.view, ref_lse.view) / lse_scale;
  return r;
}

template <class T, class O = float, class Op, class Allowed>
attn_result run_against_reference_masked(const attn_case& c, Op&& op, Allowed&& allowed) {
  return run_against_reference<T, O>(c, op, allowed);
}

// Random per-(b, h, i, j) bias with -inf entries sprinkled in.
inline std::vector<float> random_bias(std::size_t n, std::uint64_t seed, bool with_neg_inf) {
  auto g = rng(seed);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  std::vector<float> b(n);
  for (auto& x : b) x = u(g);
  if (with_neg_inf)
    for (std::size_t i = 0; i < n; i += 7) b[i] = -std::numeric_limits<float>::infinity();
  return b;
}

}  // namespace attnkit::test
