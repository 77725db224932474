// libFuzzer target: decodes shapes, strides, element types, parameters (valid or not) and values
// from the input bytes and calls the public entry points (softmax: reference, flash, merge, sparse,
// block-sparse, XAttention selection; linear with and without a state, and decode steps; circular).
// Invalid input must end in attnkit::error; anything else (a crash, a sanitizer report, another
// exception, a hang) is a bug.
//   build: cmake -DCMAKE_CXX_COMPILER=clang++ -DATTNKIT_BUILD_FUZZ=ON ...; run: fuzz_attention -max_total_time=300 CORPUS
#include <attnkit/attnkit.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using attnkit::index_t;

struct reader {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  index_t below(index_t k) { return k <= 0 ? 0 : index_t(byte()) % k; }
  float value() {
    const std::uint8_t b = byte();
    if (b == 255) return std::numeric_limits<float>::quiet_NaN();
    if (b == 254) return std::numeric_limits<float>::infinity();
    if (b == 253) return -std::numeric_limits<float>::infinity();
    if (b == 252) return 1e4f;
    return (float(b) - 126.f) / 32.f;
  }
};

// A buffer and a view over it with fuzzed strides: natural, padded, or 0 (broadcast) per axis.
template <class T, std::size_t R>
struct fuzz_tensor {
  std::vector<T> buf;
  attnkit::tensor_view<T, R> view;
  fuzz_tensor(reader& r, std::array<index_t, R> ext, bool allow_broadcast) {
    std::array<index_t, R> st{};
    index_t run = 1;
    for (std::size_t a = R; a-- > 0;) {
      const index_t mode = r.below(4);
      st[a] = (allow_broadcast && mode == 3) ? 0 : run + (mode == 2 ? r.below(3) : 0);
      run = st[a] * std::max<index_t>(ext[a], 1) + 1;
    }
    index_t max_off = 0;
    bool empty = false;
    for (std::size_t a = 0; a < R; ++a) {
      if (ext[a] == 0) empty = true;
      max_off += std::max<index_t>(ext[a] - 1, 0) * st[a];
    }
    buf.resize(empty ? 1 : std::size_t(max_off + 1));
    for (auto& x : buf) x = T(r.value());
    view = attnkit::tensor_view<T, R>(buf.data(), ext, st);
  }
};

template <class T, class O>
void run_softmax(reader& r, int op) {
  const index_t B = r.below(3), Nq = r.below(70), Nk = r.below(160), Hkv = r.below(3), Hq = Hkv * (1 + r.below(3)) + (r.below(8) == 0);
  const index_t D = r.below(40), Dv = r.below(40);
  fuzz_tensor<T, 4> q(r, {B, Nq, Hq, D}, true), k(r, {B, Nk, Hkv, D}, true), v(r, {B, Nk, Hkv, Dv}, true);
  fuzz_tensor<O, 4> out(r, {B, Nq + (r.below(16) == 0), Hq, Dv}, r.below(8) == 0);
  fuzz_tensor<O, 3> lse(r, {B, Hq, Nq}, r.below(8) == 0);
  attnkit::attention_params p;
  p.causal = r.below(2);
  p.window_left = r.below(4) == 0 ? r.below(70) - 2 : -1;
  p.window_right = r.below(4) == 0 ? r.below(70) - 2 : -1;
  if (r.below(3) == 0) p.softcap = r.value();
  if (r.below(3) == 0) p.scale = r.value();
  std::vector<float> bias_buf;
  if (r.below(3) == 0) {
    const std::array<index_t, 4> be{r.below(2) ? B : 1, r.below(2) ? Hq : 1, r.below(2) ? Nq : 1, Nk + (r.below(16) == 0)};
    bias_buf.resize(std::size_t(std::max<index_t>(be[0] * be[1] * be[2] * be[3], 1)));
    for (auto& x : bias_buf) x = r.value();
    p.bias = attnkit::tensor_view<const float, 4>(bias_buf.data(), be, {be[1] * be[2] * be[3], be[2] * be[3], be[3], 1});
  }
  std::vector<float> slopes(std::size_t(std::max<index_t>(Hq, 1)));
  if (r.below(3) == 0) {
    for (auto& x : slopes) x = r.value();
    p.alibi_slopes = slopes.data();
  }
  std::vector<index_t> lens(std::size_t(std::max<index_t>(B, 1)));
  if (r.below(3) == 0) {
    for (auto& x : lens) x = r.below(Nk + 3) - 1;
    p.kv_lengths = lens.data();
  }
  try {
    if (op == 0) attnkit::reference_attention(q.view, k.view, v.view, out.view, p, lse.view);
    if (op == 1) attnkit::flash_attention(q.view, k.view, v.view, out.view, p, lse.view);
    if (op == 2) {
      fuzz_tensor<O, 4> ob(r, {B, Nq, Hq, Dv}, true);
      fuzz_tensor<O, 3> lb(r, {B, Hq, Nq}, true);
      attnkit::merge_attention_states(out.view, lse.view, ob.view, lb.view, out.view, lse.view);
    }
    if (op == 3) {
      attnkit::sparse_pattern pat;
      pat.window_left = r.below(40) - 1;
      pat.window_right = r.below(40) - 1;
      pat.dilation = r.below(4);
      for (index_t g = r.below(3); g > 0; --g) pat.global_tokens.push_back(r.below(Nk + 2) - 1);
      pat.block_size = r.below(70);
      pat.random_blocks = r.below(4) - 1;
      pat.seed = r.byte();
      attnkit::sparse_attention(q.view, k.view, v.view, out.view, pat, p, lse.view);
    }
    if (op == 4) {
      const index_t bq = r.below(70), bk = r.below(70);
      const index_t nqb = bq > 0 ? (Nq + bq - 1) / bq + (r.below(16) == 0) : 1, nkb = bk > 0 ? (Nk + bk - 1) / bk : 1;
      std::vector<std::uint8_t> grid(std::size_t(std::max<index_t>(B * Hq * nqb * nkb, 1)));
      for (auto& g : grid) g = r.byte() & 1;
      const attnkit::tensor_view<const std::uint8_t, 4> gv(grid.data(), {B, Hq, nqb, nkb},
                                                           {Hq * nqb * nkb, nqb * nkb, nkb, 1});
      attnkit::block_sparse_attention(q.view, k.view, v.view, out.view, attnkit::block_mask::from_dense(bq, bk, gv), p,
                                      lse.view);
    }
    if (op == 5) {
      attnkit::xattention_params xp;
      xp.stride = r.below(9);
      xp.block = xp.stride * r.below(9);
      xp.threshold = r.value();
      xp.causal = r.below(2);
      (void)attnkit::xattention_select(q.view, k.view, xp);
    }
    if (op == 6) {
      attnkit::linear_params lp;
      lp.phi = attnkit::feature_map(r.below(5));
      lp.causal = r.below(2);
      lp.normalize = r.below(2);
      if (r.below(4) == 0) lp.eps = r.value();
      std::vector<float> decay(std::size_t(std::max<index_t>(Hq, 1)));
      if (r.below(3) == 0) {
        for (auto& x : decay) x = r.value();
        lp.decay = decay.data();
      }
      std::vector<float> proj;
      if (lp.phi == attnkit::feature_map::favor_positive || r.below(8) == 0) {
        const index_t m = r.below(20), d = D + (r.below(8) == 0);
        proj.resize(std::size_t(std::max<index_t>(m * d, 1)));
        for (auto& x : proj) x = r.value();
        lp.projection = attnkit::matrix(static_cast<const float*>(proj.data()), m, d);
      }
      attnkit::linear_attention(q.view, k.view, v.view, out.view, lp);
      if (lp.causal && r.below(2)) {
        // Through a state (per query head, per kv head, or of a wrong shape), then one step.
        if (lp.decay && Hkv > 0 && r.below(2))
          for (index_t h = 0; h < Hq; ++h) decay[std::size_t(h)] = decay[std::size_t(h / (Hq / Hkv) * (Hq / Hkv))];
        const index_t heads = r.below(4) == 0 ? r.below(5) : r.below(2) ? Hkv : Hq;
        attnkit::linear_attention_state<float> st(B + (r.below(8) == 0), heads,
                                                  attnkit::linear_feature_dim(lp, D) + (r.below(8) == 0), Dv);
        attnkit::linear_attention(q.view, k.view, v.view, out.view, lp, st);
        const auto first = [](auto& t) { return t.view.slice(1, 0, std::min<index_t>(1, t.view.extent(1))); };
        attnkit::linear_attention_step(st, first(q), first(k), first(v), first(out), lp);
      }
    }
    if (op == 7) {
      fuzz_tensor<T, 3> logits(r, {B, Hkv + (r.below(8) == 0), Nk}, true);
      fuzz_tensor<O, 4> o2(r, {B, Nk, Hkv, Dv + (r.below(8) == 0)}, r.below(8) == 0);
      attnkit::circular_params cp;
      cp.causal = r.below(2);
      cp.renormalize = r.below(2);
      attnkit::circular_attention(logits.view, v.view, o2.view, cp);
    }
  } catch (const attnkit::error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  reader r{data, size};
  const int op = int(r.below(8));
  switch (r.below(4)) {
    case 0: run_softmax<float, float>(r, op); break;
    case 1: run_softmax<attnkit::bf16, float>(r, op); break;
    case 2: run_softmax<attnkit::f16, float>(r, op); break;
    default: run_softmax<double, double>(r, op); break;
  }
  return 0;
}
