// Randomized differential testing: seeded random shapes, memory layouts, element types and
// parameters, every operator against its reference at the documented tolerance. A failing case
// prints a one-line reproducer. ATTNKIT_DIFF_CASES (default 1500) and ATTNKIT_DIFF_SEED (default
// 20261123) change the run; the `differential_long` build target runs 100000 cases.
#include "block_sparse_cases.hpp"

#include <cstdlib>
#include <functional>

using namespace attnkit;
using test::attn_case;
using test::layout;

namespace {

std::uint64_t env_or(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::strtoull(v, nullptr, 10) : fallback;
}

struct draw {
  std::mt19937_64 g;
  explicit draw(std::uint64_t seed) : g(seed) {}
  index_t range(index_t lo, index_t hi) { return std::uniform_int_distribution<index_t>(lo, hi)(g); }
  bool chance(double p) { return std::bernoulli_distribution(p)(g); }
  template <class T>
  T pick(std::initializer_list<T> xs) {
    return *(xs.begin() + range(0, index_t(xs.size()) - 1));
  }
  // Sizes favour small values but reach the tile boundaries (48/64) and beyond.
  index_t size(index_t lo, index_t hi) { return chance(0.7) ? range(lo, std::min<index_t>(hi, lo + 9)) : range(lo, hi); }
};

attn_case random_case(draw& d, std::uint64_t seed) {
  attn_case c;
  c.seed = seed;
  c.B = d.chance(0.03) ? 0 : d.size(1, 3);
  c.Nq = d.chance(0.03) ? 0 : d.chance(0.3) ? d.size(1, 4) : d.size(1, 130);
  c.Nk = d.chance(0.03) ? 0 : d.size(1, 600);
  c.Hkv = d.size(1, 3);
  c.Hq = c.Hkv * d.pick<index_t>({1, 1, 2, 4});
  c.D = d.size(1, 80);
  c.Dv = d.chance(0.5) ? -1 : d.size(1, 80);
  c.lay = d.pick({layout::bshd, layout::bhsd, layout::padded, layout::strided});
  c.p.causal = d.chance(0.4);
  if (d.chance(0.25)) c.p.window_left = d.range(0, 60);
  if (d.chance(0.2)) c.p.window_right = d.range(0, 60);
  if (d.chance(0.2)) c.p.softcap = float(d.range(1, 30)) / 4.f;
  if (d.chance(0.15)) c.p.scale = float(d.range(1, 40)) / 20.f;
  if (d.chance(0.2)) {
    c.bias_extents = {d.chance(0.5) ? c.B : 1, d.chance(0.5) ? c.Hq : 1, d.chance(0.5) ? c.Nq : 1, c.Nk};
    const auto& e = c.bias_extents;
    c.bias_data = test::random_bias(std::size_t(std::max<index_t>(e[0] * e[1] * e[2] * e[3], 1)), seed, d.chance(0.5));
  }
  if (d.chance(0.2))
    for (index_t h = 0; h < c.Hq; ++h) c.slopes.push_back(float(d.range(0, 100)) / 128.f);
  if (d.chance(0.3))
    for (index_t b = 0; b < c.B; ++b) c.lengths.push_back(d.range(0, c.Nk));
  if (d.chance(0.1)) c.q_amp = 8.f;
  return c;
}

enum class dtype { f32, bf16, f16, f64 };
const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "float";
    case dtype::bf16: return "bf16";
    case dtype::f16: return "f16";
    case dtype::f64: return "double";
  }
  return "?";
}

template <class Op>
test::attn_result run_typed(dtype t, const attn_case& c, Op&& op) {
  switch (t) {
    case dtype::f32: return test::run_against_reference<float, float>(c, op);
    case dtype::bf16: return test::run_against_reference<bf16, float>(c, op);
    case dtype::f16: return test::run_against_reference<f16, float>(c, op);
    case dtype::f64: return test::run_against_reference<double, double>(c, op);
  }
  return {};
}

// One operator under differential test: runs on an attn_case the way run_against_reference calls.
struct softmax_operator {
  const char* name;
  std::function<test::attn_result(dtype, const attn_case&)> run;
};

const auto flash_op = [](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) {
  flash_attention(q, k, v, out, p, lse);
};

// flash on the keys split in two parts, merged: must equal the whole.
const auto split_merge_op = [](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) {
  using O = std::remove_reference_t<decltype(out(0, 0, 0, 0))>;
  const index_t B = q.extent(0), Nq = q.extent(1), Hq = q.extent(2), Dv = v.extent(3), Nk = k.extent(1);
  const index_t split = Nk / 3;
  test::tensor4<O> oa(B, Nq, Hq, Dv), ob(B, Nq, Hq, Dv);
  test::tensor3<O> la(B, Hq, Nq), lb(B, Hq, Nq);
  // Each part sees its own keys with the bias restricted to them; masks use absolute positions,
  // so the split is only meaningful for the mask-free case: other params are checked by flash_op.
  attention_params part;
  part.scale = p.scale;
  part.softcap = p.softcap;
  flash_attention(q, k.slice(1, 0, split), v.slice(1, 0, split), oa.view, part, la.view);
  flash_attention(q, k.slice(1, split, Nk), v.slice(1, split, Nk), ob.view, part, lb.view);
  merge_attention_states(oa.view, la.view, ob.view, lb.view, out, lse);
};

// sparse_attention with a random structured pattern; the reference masks with to_csr's pairs.
test::attn_result run_sparse(dtype t, const attn_case& c, std::uint64_t seed) {
  draw d(seed ^ 0x5eed);
  sparse_pattern pat;
  pat.window_left = d.range(0, 40);
  pat.window_right = d.range(0, 40);
  pat.dilation = d.pick<index_t>({1, 1, 2, 3});
  if (d.chance(0.4))
    for (index_t g = 0; g < d.range(1, 3); ++g) pat.global_tokens.push_back(d.range(0, std::max<index_t>(c.Nk, 1) - 1));
  if (c.Nk == 0) pat.global_tokens.clear();
  if (d.chance(0.4)) {
    pat.block_size = d.pick<index_t>({8, 16, 64});
    pat.random_blocks = d.range(1, 3);
    pat.seed = seed;
  }
  std::vector<csr_pattern> per_head;
  for (index_t h = 0; h < c.Hq; ++h) per_head.push_back(to_csr(pat, c.Nq, c.Nk, h));
  auto allowed = [&](index_t, index_t h, index_t i, index_t j) {
    const auto& cs = per_head[std::size_t(h)];
    return std::binary_search(cs.col_idx.begin() + cs.row_ptr[i], cs.col_idx.begin() + cs.row_ptr[i + 1], j);
  };
  auto op = [&](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) { sparse_attention(q, k, v, out, pat, p, lse); };
  switch (t) {
    case dtype::f32: return test::run_against_reference_masked<float, float>(c, op, allowed);
    case dtype::bf16: return test::run_against_reference_masked<bf16, float>(c, op, allowed);
    case dtype::f16: return test::run_against_reference_masked<f16, float>(c, op, allowed);
    case dtype::f64: return test::run_against_reference_masked<double, double>(c, op, allowed);
  }
  return {};
}

// block_sparse_attention with a random mask of random block sizes.
test::attn_result run_block_sparse(dtype t, const attn_case& c, std::uint64_t seed) {
  draw d(seed ^ 0xb10c);
  const block_mask mask = test::random_mask(c, d.range(1, 80), d.range(1, 80), double(d.range(1, 10)) / 10.0, seed);
  switch (t) {
    case dtype::f32: return test::run_masked<float, float>(c, mask);
    case dtype::bf16: return test::run_masked<bf16, float>(c, mask);
    case dtype::f16: return test::run_masked<f16, float>(c, mask);
    case dtype::f64: return test::run_masked<double, double>(c, mask);
  }
  return {};
}

}  // namespace

TEST_CASE("differential: random problems against the references") {
  const std::uint64_t cases = env_or("ATTNKIT_DIFF_CASES", 1500), seed0 = env_or("ATTNKIT_DIFF_SEED", 20261123);
  const std::vector<softmax_operator> ops{
      {"flash_attention", [](dtype t, const attn_case& c) { return run_typed(t, c, flash_op); }},
      {"sparse_attention", [](dtype t, const attn_case& c) { return run_sparse(t, c, c.seed); }},
      {"block_sparse_attention", [](dtype t, const attn_case& c) { return run_block_sparse(t, c, c.seed); }},
      {"merge_attention_states(split)",
       [](dtype t, const attn_case& c) {
         attn_case plain = c;  // masks and additive terms off: see split_merge_op
         plain.p.causal = false;
         plain.p.window_left = plain.p.window_right = -1;
         plain.bias_data.clear();
         plain.slopes.clear();
         plain.lengths.clear();
         return run_typed(t, plain, split_merge_op);
       }},
  };
  index_t failures = 0, run = 0;
  for (std::uint64_t n = 0; n < cases; ++n) {
    const std::uint64_t seed = seed0 + n;
    draw d(seed);
    const attn_case c = random_case(d, seed);
    const dtype t = d.pick({dtype::f32, dtype::f32, dtype::bf16, dtype::f16, dtype::f64});
    const auto& op = ops[std::size_t(d.range(0, index_t(ops.size()) - 1))];
    const double tol = t == dtype::f64 ? 1e-12 : 2e-5;
    const auto r = op.run(t, c);
    ++run;
    const bool ok = !r.out.mismatched_nonfinite && r.out.rel() <= tol && r.lse_err <= tol;
    if (!ok) {
      ++failures;
      // One line: enough to rerun this exact case with ATTNKIT_DIFF_SEED=<seed> ATTNKIT_DIFF_CASES=1.
      std::printf("REPRO ATTNKIT_DIFF_SEED=%llu ATTNKIT_DIFF_CASES=1 op=%s dtype=%s %s rel=%g lse=%g nonfinite=%d\n",
                  (unsigned long long)seed, op.name, dtype_name(t), test::describe(c).c_str(), r.out.rel(), r.lse_err,
                  int(r.out.mismatched_nonfinite));
    }
  }
  INFO("cases run: " << run);
  CHECK(failures == 0);
}
