// Extreme values and sizes, every operator against its reference:
//  * subnormal inputs (alone and mixed with normal values), with the FPU's control bits (MXCSR:
//    flush-to-zero, denormals-are-zero, rounding, exception masks) left as the caller set them, on
//    the calling thread and on the OpenMP threads;
//  * NaN in one query row stays in that row's output (and log-sum-exp) only;
//  * 4096 heads of one token, and one head of 2048-4096 positions (262144 keys for decode);
//  * index arithmetic beyond 32 bits: views whose element offsets exceed 2^32 (in a reserved,
//    mostly untouched address range), and key counts above 2^32 through broadcast (stride 0) keys
//    with windows that keep the work small; sizes whose element count overflows are rejected.
// Tolerances are the operators' own (flash_cases.hpp, linear_cases.hpp, circular_cases.hpp) except
// where an output is itself subnormal: see "subnormal values".
#include "block_sparse_cases.hpp"
#include "circular_cases.hpp"
#include "linear_cases.hpp"

#include <cstring>

#if defined(__x86_64__) || defined(__SSE__)
#include <xmmintrin.h>
#define ATTNKIT_TEST_MXCSR 1
#endif
#if defined(__unix__)
#include <sys/mman.h>
#define ATTNKIT_TEST_MMAP 1
#endif

using namespace attnkit;
using test::attn_case;
using test::layout;
using test::tensor3;
using test::tensor4;

namespace {

constexpr float subnormal = 1e-39f;  // FLT_MIN is 1.2e-38: |x| * 1e-39 for |x| <= 1 is subnormal
const float fnan = std::numeric_limits<float>::quiet_NaN();

// ---- FPU control bits ------------------------------------------------------------------------------

// MXCSR without its sticky exception flags (bits 0-5), on the calling thread and then on each thread
// of an OpenMP team of the default size (the pool the operators use).
std::vector<unsigned> fpu_controls() {
  std::vector<unsigned> r;
#if ATTNKIT_TEST_MXCSR
  r.push_back(_mm_getcsr() & ~0x3Fu);
#if defined(_OPENMP)
  std::vector<unsigned> team(static_cast<std::size_t>(omp_get_max_threads()), 0);
#pragma omp parallel
  team[static_cast<std::size_t>(omp_get_thread_num())] = _mm_getcsr() & ~0x3Fu;
  r.insert(r.end(), team.begin(), team.end());
#endif
#endif
  return r;
}

// ---- softmax operators through attn_case -------------------------------------------------------------

const auto flash_op = [](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) {
  flash_attention(q, k, v, out, p, lse);
};

sparse_pattern test_pattern(index_t Nk) {
  sparse_pattern pat;
  pat.window_left = 20;
  pat.window_right = 3;
  if (Nk > 7) pat.global_tokens = {0, 7};
  pat.random_blocks = 1;
  pat.block_size = 16;
  pat.seed = 3;
  return pat;
}

// Runs flash, sparse and block-sparse attention on case c against the reference; returns the
// worst relative output error and lse error over the three, and whether NaN/inf ever disagreed.
struct softmax_errors {
  double out = 0, lse = 0;
  bool nonfinite = false;
  void add(const test::attn_result& r) {
    out = std::max(out, r.out.rel());
    lse = std::max(lse, r.lse_err);
    nonfinite = nonfinite || r.out.mismatched_nonfinite;
  }
};

template <class T>
softmax_errors softmax_operators(const attn_case& c) {
  softmax_errors e;
  e.add(test::run_against_reference<T, float>(c, flash_op));
  const sparse_pattern pat = test_pattern(c.Nk);
  std::vector<csr_pattern> per_head;
  for (index_t h = 0; h < c.Hq; ++h) per_head.push_back(to_csr(pat, c.Nq, c.Nk, h));
  e.add(test::run_against_reference_masked<T, float>(
      c, [&](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) { sparse_attention(q, k, v, out, pat, p, lse); },
      [&](index_t, index_t h, index_t i, index_t j) {
        const auto& cs = per_head[std::size_t(h)];
        return std::binary_search(cs.col_idx.begin() + cs.row_ptr[i], cs.col_idx.begin() + cs.row_ptr[i + 1], j);
      }));
  e.add(test::run_masked<T, float>(c, test::random_mask(c, 16, 32, 0.6, c.seed)));
  return e;
}

attn_case base_case(std::uint64_t seed) {
  attn_case c;
  c.B = 2;
  c.Nq = 37;
  c.Nk = 150;
  c.Hq = 4;
  c.Hkv = 2;
  c.D = 40;
  c.seed = seed;
  return c;
}

}  // namespace

// ---- subnormal values -------------------------------------------------------------------------------
//
// Subnormal inputs mixed with normal ones, or subnormal q and k (logits underflow to 0: uniform
// weights), are held to the operators' usual tolerances. Where the outputs are themselves subnormal
// (subnormal v), float keeps only about 16 significant bits at 1e-40 (spacing 1.4e-45) and every
// rounding is absolute at that spacing: those cases require max |out - ref| <= 1e-2 max |ref| —
// far from the error of 1 that flushing subnormals to zero (FTZ/DAZ) would give.

TEST_CASE("subnormal inputs: flash, sparse and block-sparse match the reference") {
  const auto fpu = fpu_controls();
  for (bool causal : {false, true}) {
    INFO("causal=" << causal);
    attn_case c = base_case(11);
    c.p.causal = causal;
    c.tiny = subnormal;  // a third of the elements subnormal
    auto e = softmax_operators<float>(c);
    CHECK_FALSE(e.nonfinite);
    CHECK(e.out <= 2e-5);
    CHECK(e.lse <= 2e-5);
    e = softmax_operators<bf16>(c);
    CHECK(e.out <= 2e-5);
    CHECK(e.lse <= 2e-5);

    c = base_case(12);
    c.p.causal = causal;
    c.q_amp = c.k_amp = subnormal;  // every logit underflows
    e = softmax_operators<float>(c);
    CHECK(e.out <= 2e-5);
    CHECK(e.lse <= 2e-5);

    c = base_case(13);
    c.p.causal = causal;
    c.v_amp = subnormal;  // subnormal outputs
    e = softmax_operators<float>(c);
    INFO("subnormal v: rel " << e.out);
    CHECK_FALSE(e.nonfinite);
    CHECK(e.out <= 1e-2);
    CHECK(e.lse <= 2e-5);
  }
  CHECK(fpu_controls() == fpu);
}

TEST_CASE("subnormal inputs: linear attention matches the reference for every feature map") {
  const auto fpu = fpu_controls();
  const index_t B = 2, N = 90, Hq = 4, Hkv = 2, D = 24, Dv = 20;
  const favor_projection proj = make_favor_projection(32, D, 4);
  const float decay[Hq] = {0.9f, 1.f, 0.99f, 0.7f};
  for (feature_map phi : test::all_feature_maps)
    for (bool causal : {false, true}) {
      const bool normalize = phi != feature_map::identity;
      const linear_params p = test::make_linear_params(phi, causal, normalize, causal ? decay : nullptr, &proj);
      INFO(feature_map_name(phi) << " causal=" << causal);
      {
        test::qkv<float> in(B, N, N, Hq, Hkv, D, Dv, 21, test::needs_positive(phi, normalize));
        test::scale_every(in.q, 3, subnormal);
        test::scale_every(in.k, 3, subnormal);
        test::scale_every(in.v, 3, subnormal);
        const auto e = test::against_reference(in.q.view, in.k.view, in.v.view, p);
        INFO("mixed: rel " << e.rel());
        CHECK_FALSE(e.mismatched_nonfinite);
        CHECK(e.rel() <= test::linear_tol_float);
      }
      if (phi == feature_map::elu_plus_one || phi == feature_map::favor_positive || phi == feature_map::cosine) {
        // Subnormal q and k: phi is about 1 (elu + 1), exp(-0) / sqrt(m) (FAVOR+) or x / |x| (cosine,
        // whose |x|^2 is far below float's range). identity and relu would multiply two subnormals,
        // below float's range by definition of the map: not compared.
        test::qkv<float> in(B, N, N, Hq, Hkv, D, Dv, 22, test::needs_positive(phi, normalize));
        test::scale_every(in.q, 1, subnormal);
        test::scale_every(in.k, 1, subnormal);
        const auto e = test::against_reference(in.q.view, in.k.view, in.v.view, p);
        INFO("subnormal q and k: rel " << e.rel());
        CHECK_FALSE(e.mismatched_nonfinite);
        CHECK(e.rel() <= test::linear_tol_float);
      }
      {
        test::qkv<float> in(B, N, N, Hq, Hkv, D, Dv, 23, test::needs_positive(phi, normalize));
        test::scale_every(in.v, 1, subnormal);
        const auto e = test::against_reference(in.q.view, in.k.view, in.v.view, p);
        INFO("subnormal v: rel " << e.rel());
        CHECK_FALSE(e.mismatched_nonfinite);
        CHECK(e.rel() <= 1e-2);
      }
    }
  CHECK(fpu_controls() == fpu);
}

TEST_CASE("cosine feature map of rows whose squared norm is outside float's range") {
  // x / |x| is defined for every non-zero float row; |x|^2 underflows below |x| ~ 1e-19 and
  // overflows above ~1e19.
  const index_t N = 40, D = 24;
  for (float scale : {1e-25f, 1e-40f, 1e20f, 1e35f})
    for (bool causal : {false, true}) {
      INFO("q, k scaled by " << scale << " causal=" << causal);
      test::qkv<float> in(1, N, N, 2, 1, D, D, 25, true);
      test::scale_every(in.q, 1, scale);
      test::scale_every(in.k, 1, scale);
      const linear_params p = test::make_linear_params(feature_map::cosine, causal, true, nullptr, nullptr);
      const auto e = test::against_reference(in.q.view, in.k.view, in.v.view, p);
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.rel() <= test::linear_tol_float);
    }
}

TEST_CASE("subnormal inputs: circular attention matches the reference") {
  const auto fpu = fpu_controls();
  const index_t B = 2, N = 300, H = 3, D = 21;
  for (int mode = 0; mode < 3; ++mode) {
    INFO(test::mode_name(mode));
    tensor3<float> l(B, H, N);
    test::fill_logits(l, 30, 3.f);
    tensor4<float> v(B, N, H, D);
    test::fill_uniform(v, 31);
    test::scale_every(v, 3, subnormal);
    for (std::size_t i = 0; i < l.buf.size(); i += 3) l.buf[i] *= subnormal;
    auto e = test::run_and_compare(l.view, v.view, test::mode_params(mode));
    CHECK_FALSE(e.mismatched_nonfinite);
    CHECK(e.max_abs <= test::circular_tol);
    // Subnormal logits only: uniform weights.
    for (auto& x : l.buf) x = subnormal;
    e = test::run_and_compare(l.view, v.view, test::mode_params(mode));
    CHECK(e.max_abs <= test::circular_tol);
    // Subnormal values only: subnormal outputs, compared relative to their size.
    test::fill_logits(l, 32, 3.f);
    test::fill_uniform(v, 33, subnormal);
    e = test::run_and_compare(l.view, v.view, test::mode_params(mode));
    INFO("subnormal v: rel " << e.rel());
    CHECK_FALSE(e.mismatched_nonfinite);
    CHECK(e.rel() <= 1e-2);
  }
  CHECK(fpu_controls() == fpu);
}

TEST_CASE("operators keep a caller's flush-to-zero and denormals-are-zero modes") {
#if ATTNKIT_TEST_MXCSR
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);  // FTZ | DAZ on the calling thread
  const auto fpu = fpu_controls();
  attn_case c = base_case(40);
  (void)softmax_operators<float>(c);
  test::qkv<float> in(1, 70, 70, 2, 1, 16, 16, 41);
  tensor4<float> out(1, 70, 2, 16);
  linear_params lp;
  lp.causal = true;
  linear_attention(in.q.view, in.k.view, in.v.view, out.view, lp);
  tensor3<float> l(1, 2, 70);
  test::fill_logits(l, 42, 2.f);
  circular_attention(l.view, in.q.view, out.view, test::mode_params(2));
  averaged_key_logits(in.q.view, in.k.view, l.view);
  xattention_params xp;
  xp.block = 16;
  (void)xattention_select(in.q.view, in.k.view, xp);
  tensor4<float> a(1, 70, 2, 16), b(1, 70, 2, 16);
  tensor3<float> la(1, 2, 70), lb(1, 2, 70);
  flash_attention(in.q.view, in.k.view, in.v.view, a.view, {}, la.view);
  flash_attention(in.q.view, in.k.view, in.v.view, b.view, {}, lb.view);
  merge_attention_states(a.view, la.view, b.view, lb.view, out.view, l.view);
  CHECK(fpu_controls() == fpu);
  CHECK((_mm_getcsr() & 0x8040u) == 0x8040u);
  _mm_setcsr(saved);
#else
  SUCCEED("no MXCSR on this target");
#endif
}

// ---- NaN in one query row ------------------------------------------------------------------------------

namespace {

// q(1, 33, 2, 5) = NaN: exactly the outputs and lse of (batch 1, row 33, head 2) are NaN. Every row
// keeps at least one key under the params used, so no row is fully masked (output 0 by definition).
template <class Op>
void check_nan_row(const char* name, Op&& op, bool with_lse = true) {
  const index_t B = 2, Nq = 70, Nk = 90, Hq = 4, Hkv = 2, D = 24;
  tensor4<float> q(B, Nq, Hq, D), k(B, Nk, Hkv, D), v(B, Nk, Hkv, D), out(B, Nq, Hq, D);
  tensor3<float> lse(B, Hq, Nq);
  test::fill_uniform(q, 50);
  test::fill_uniform(k, 51);
  test::fill_uniform(v, 52);
  q(1, 33, 2, 5) = fnan;
  op(q.view, k.view, v.view, out.view, lse.view);
  index_t wrong = 0;
  for (index_t b = 0; b < B; ++b)
    for (index_t i = 0; i < Nq; ++i)
      for (index_t h = 0; h < Hq; ++h) {
        const bool poisoned = b == 1 && i == 33 && h == 2;
        for (index_t d = 0; d < D; ++d) wrong += std::isnan(out(b, i, h, d)) != poisoned;
        if (with_lse) wrong += std::isnan(lse.view(b, h, i)) != poisoned;
      }
  INFO(name);
  CHECK(wrong == 0);
}

}  // namespace

TEST_CASE("NaN in one query row stays in that row's output and lse: every operator") {
  for (bool causal : {false, true}) {
    INFO("causal=" << causal);
    attention_params p;
    p.causal = causal;
    check_nan_row("flash_attention", [&](auto q, auto k, auto v, auto out, auto lse) { flash_attention(q, k, v, out, p, lse); });
    check_nan_row("reference_attention",
                  [&](auto q, auto k, auto v, auto out, auto lse) { reference_attention(q, k, v, out, p, lse); });
    check_nan_row("sparse_attention", [&](auto q, auto k, auto v, auto out, auto lse) {
      sparse_attention(q, k, v, out, test_pattern(k.extent(1)), p, lse);
    });
    check_nan_row("block_sparse_attention", [&](auto q, auto k, auto v, auto out, auto lse) {
      const block_mask m = causal ? block_mask::causal(16, 32, q.extent(1), k.extent(1), q.extent(0), q.extent(2))
                                  : block_mask::local(16, 32, q.extent(1), k.extent(1), 1, 1, q.extent(0), q.extent(2));
      block_sparse_attention(q, k, v, out, m, p, lse);
    });
    check_nan_row("block_sparse_attention(xattention_select)", [&](auto q, auto k, auto v, auto out, auto lse) {
      xattention_params xp;
      xp.block = 16;
      xp.causal = causal;
      block_sparse_attention(q, k, v, out, xattention_select(q, k, xp), p, lse);
    });
    check_nan_row("merge_attention_states", [&](auto q, auto k, auto v, auto out, auto lse) {
      const index_t B = q.extent(0), Nq = q.extent(1), H = q.extent(2), D = v.extent(3);
      tensor4<float> a(B, Nq, H, D), b(B, Nq, H, D);
      tensor3<float> la(B, H, Nq), lb(B, H, Nq);
      flash_attention(q, k.slice(1, 0, 40), v.slice(1, 0, 40), a.view, {}, la.view);
      flash_attention(q, k.slice(1, 40, 90), v.slice(1, 40, 90), b.view, p, lb.view);
      merge_attention_states(a.view, la.view, b.view, lb.view, out, lse);
    });
  }
  // Linear attention (no lse): every map, both forms. Causal needs Nq == Nk: q serves as keys too.
  const favor_projection proj = make_favor_projection(32, 24, 5);
  for (feature_map phi : test::all_feature_maps)
    for (bool causal : {false, true}) {
      const linear_params lp = test::make_linear_params(phi, causal, true, nullptr, &proj);
      INFO(feature_map_name(phi) << " causal=" << causal);
      check_nan_row(
          "linear_attention",
          [&](auto q, auto k, auto v, auto out, auto) {
            if (causal) linear_attention(q, q.slice(2, 0, 2), q.slice(2, 0, 2), out, lp);
            else linear_attention(q, k, v, out, lp);
          },
          false);
    }
  // CAT: averaged_key_logits keeps the NaN in its row's logit; circular_attention then makes that
  // whole (batch, head) NaN by its definition (a NaN logit poisons the head's softmax), no other.
  tensor4<float> q(2, 70, 4, 24), k(2, 90, 2, 24), v(2, 70, 4, 8), out(2, 70, 4, 8);
  test::fill_uniform(q, 60);
  test::fill_uniform(k, 61);
  test::fill_uniform(v, 62);
  q(1, 33, 2, 5) = fnan;
  tensor3<float> logits(2, 4, 70);
  averaged_key_logits(q.view, k.view, logits.view);
  index_t wrong = 0;
  for (index_t b = 0; b < 2; ++b)
    for (index_t h = 0; h < 4; ++h)
      for (index_t i = 0; i < 70; ++i) wrong += std::isnan(logits.view(b, h, i)) != (b == 1 && h == 2 && i == 33);
  CHECK(wrong == 0);
  circular_attention(logits.view, v.view, out.view);
  for (index_t b = 0; b < 2; ++b)
    for (index_t h = 0; h < 4; ++h)
      for (index_t i = 0; i < 70; ++i)
        for (index_t d = 0; d < 8; ++d) wrong += std::isnan(out(b, i, h, d)) != (b == 1 && h == 2);
  CHECK(wrong == 0);
}

// ---- head counts and sequence lengths at the extremes -----------------------------------------------------

TEST_CASE("4096 heads of one token, and one head of a long sequence") {
  SECTION("softmax operators") {
    attn_case c;
    c.B = 1;
    c.Hq = 4096;
    c.Hkv = 512;
    c.D = 8;
    for (index_t nk : {1, 3}) {
      c.Nq = 1;
      c.Nk = nk;
      INFO("H=4096 Nq=1 Nk=" << nk);
      const auto e = softmax_operators<float>(c);
      CHECK(e.out <= 2e-5);
      CHECK(e.lse <= 2e-5);
    }
    attn_case l;
    l.Hq = l.Hkv = 1;
    l.D = 16;
    l.Nq = l.Nk = 2048;  // the O(N^2) references (three of them) bound N under the sanitizers
    l.p.causal = true;
    {
      INFO("H=1 N=2048 causal");
      const auto e = softmax_operators<float>(l);
      CHECK(e.out <= 2e-5);
      CHECK(e.lse <= 2e-5);
    }
    l.Nq = 1;
    l.Nk = 1 << 18;
    l.p.causal = false;
    INFO("H=1 Nq=1 Nk=262144 (decode)");
    const auto r = test::run_against_reference<float, float>(l, flash_op);
    CHECK(r.out.rel() <= 2e-5);
    CHECK(r.lse_err <= 2e-5);
  }
  SECTION("linear attention") {
    const favor_projection proj = make_favor_projection(16, 8, 6);
    for (feature_map phi : {feature_map::elu_plus_one, feature_map::favor_positive})
      for (bool causal : {false, true}) {
        INFO(feature_map_name(phi) << " causal=" << causal);
        const linear_params p = test::make_linear_params(phi, causal, true, nullptr, &proj);
        const test::qkv<float> wide(1, 1, 1, 4096, 512, 8, 8, 70);
        CHECK(test::against_reference(wide.q.view, wide.k.view, wide.v.view, p).rel() <= test::linear_tol_float);
        const test::qkv<float> deep(1, 4096, 4096, 1, 1, 8, 4, 71);
        CHECK(test::against_reference(deep.q.view, deep.k.view, deep.v.view, p).rel() <= test::linear_tol_float);
      }
  }
  SECTION("circular attention") {
    for (int mode = 0; mode < 3; ++mode) {
      INFO(test::mode_name(mode));
      for (index_t n : {1, 3}) {
        tensor3<float> l(1, 4096, n);
        test::fill_logits(l, 80, 3.f);
        tensor4<float> v(1, n, 4096, 8);
        test::fill_uniform(v, 81);
        CHECK(test::run_and_compare(l.view, v.view, test::mode_params(mode)).max_abs <= test::circular_tol);
      }
      tensor3<float> l(1, 1, 2048);  // the O(N^2) reference bounds N (test_circular runs N = 10007)
      test::fill_logits(l, 82, 3.f);
      tensor4<float> v(1, 2048, 1, 1);
      test::fill_uniform(v, 83);
      CHECK(test::run_and_compare(l.view, v.view, test::mode_params(mode)).max_abs <= test::circular_tol);
    }
  }
}

// ---- index arithmetic beyond 32 bits ------------------------------------------------------------------
//
// What is exercised: (1) element offsets above 2^32 that are dereferenced: two batches 2^32 + 1024
// elements apart (16 GiB of address space, reserved with MAP_NORESERVE; only the pages of the few
// thousand elements used are touched), for every operator, compared bitwise with the same call on
// compact copies — an offset computed in 32 bits would read and write the other batch's memory; (2)
// key counts and positions above 2^32 (mask alignment i + Nk - Nq, windows, kv_lengths) through
// broadcast keys (stride 0, so no memory) with windows that keep the work small, checked against the
// closed form (identical keys: out = v, lse = s + log(number of keys)); (3) sizes whose element count
// overflows 64 bits are rejected (tensor_view, linear_attention_state, circular's length limit).
// Not exercised: a dense operator actually visiting more than 2^32 keys or scores (minutes of work),
// nor an output with more than 2^32 elements (16 GiB of memory).

namespace {

#if ATTNKIT_TEST_MMAP
// Address space whose pages are backed only once touched.
class reserved_range {
 public:
  explicit reserved_range(std::size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    p_ = p == MAP_FAILED ? nullptr : static_cast<float*>(p);
  }
  ~reserved_range() {
    if (p_) munmap(p_, bytes_);
  }
  reserved_range(const reserved_range&) = delete;
  reserved_range& operator=(const reserved_range&) = delete;
  float* data() const { return p_; }

 private:
  float* p_ = nullptr;
  std::size_t bytes_;
};

// Tensors of batch 2 whose batch stride is far_stride elements: batch 1 starts beyond element 2^32.
// Each tensor gets its own slot of slot_size elements at the start of each batch.
struct far_batches {
  static constexpr index_t far_stride = (index_t(1) << 32) + 1024, slot_size = index_t(1) << 20;
  reserved_range mem{static_cast<std::size_t>(far_stride + 16 * slot_size) * sizeof(float)};
  int next = 0;

  tensor_view<float, 4> bshd(index_t N, index_t H, index_t D) {
    REQUIRE(N * H * D <= slot_size);
    return tensor_view<float, 4>(mem.data() + slot_size * next++, {2, N, H, D}, {far_stride, H * D, D, 1});
  }
  tensor_view<float, 3> bhs(index_t H, index_t N) {
    REQUIRE(H * N <= slot_size);
    return tensor_view<float, 3>(mem.data() + slot_size * next++, {2, H, N}, {far_stride, N, 1});
  }
};

template <class T, std::size_t R>
void fill_view(const tensor_view<T, R>& v, std::uint64_t seed) {
  auto g = test::rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::array<index_t, R> i{};
  const index_t n = v.size();
  for (index_t c = 0; c < n; ++c) {
    index_t r = c;
    for (std::size_t a = R; a-- > 0;) {
      i[a] = r % v.extent(a);
      r /= v.extent(a);
    }
    std::apply([&](auto... ix) { v(ix...) = T(u(g)); }, i);
  }
}

// A compact (row-major) copy of a view, as an owning buffer and view.
template <std::size_t R>
struct compact {
  std::vector<float> buf;
  tensor_view<float, R> view;
  explicit compact(const tensor_view<float, R>& far) : buf(static_cast<std::size_t>(std::max<index_t>(far.size(), 1))) {
    std::array<index_t, R> st{};
    index_t s = 1;
    for (std::size_t a = R; a-- > 0;) {
      st[a] = s;
      s *= far.extent(a);
    }
    view = tensor_view<float, R>(buf.data(), far.extents(), st);
    for_each(far, [&](auto... ix) { view(ix...) = far(ix...); });
  }
  template <class F>
  static void for_each(const tensor_view<float, R>& v, F&& f) {
    std::array<index_t, R> i{};
    for (index_t c = 0; c < v.size(); ++c) {
      index_t r = c;
      for (std::size_t a = R; a-- > 0;) {
        i[a] = r % v.extent(a);
        r /= v.extent(a);
      }
      std::apply(f, i);
    }
  }
  // Bitwise equality with the far view.
  bool same_as(const tensor_view<float, R>& far) const {
    bool same = true;
    for_each(far, [&](auto... ix) { same = same && std::memcmp(&far(ix...), &view(ix...), sizeof(float)) == 0; });
    return same;
  }
};
#endif

}  // namespace

TEST_CASE("element offsets beyond 2^32: every operator reads and writes the right elements") {
#if ATTNKIT_TEST_MMAP
  far_batches far;
  if (!far.mem.data()) {
    WARN("could not reserve 16 GiB of address space (MAP_NORESERVE): skipped");
    return;
  }
  const index_t N = 100, Hq = 4, Hkv = 2, D = 24;
  auto q = far.bshd(N, Hq, D), k = far.bshd(N, Hkv, D), v = far.bshd(N, Hkv, D), out = far.bshd(N, Hq, D);
  auto lse = far.bhs(Hq, N);
  fill_view(q, 1);
  fill_view(k, 2);
  fill_view(v, 3);
  fill_view(out, 4);
  fill_view(lse, 5);
  compact<4> cq(q), ck(k), cv(v), cout(out);
  compact<3> clse(lse);
  // Runs op(q, k, v, out, lse) on the far views and on the compact copies: the outputs must agree bitwise.
  auto check = [&](const char* name, auto&& op) {
    INFO(name);
    op(q, k, v, out, lse);
    op(cq.view, ck.view, cv.view, cout.view, clse.view);
    CHECK(cout.same_as(out));
    CHECK(clse.same_as(lse));
  };
  attention_params p;
  p.causal = true;
  check("flash_attention", [&](auto q_, auto k_, auto v_, auto o_, auto l_) { flash_attention(q_, k_, v_, o_, p, l_); });
  check("flash_attention decode", [&](auto q_, auto k_, auto v_, auto o_, auto l_) {
    flash_attention(q_.slice(1, 0, 1), k_, v_, o_.slice(1, 0, 1), {}, l_.slice(2, 0, 1));
  });
  check("reference_attention", [&](auto q_, auto k_, auto v_, auto o_, auto l_) { reference_attention(q_, k_, v_, o_, p, l_); });
  check("sparse_attention", [&](auto q_, auto k_, auto v_, auto o_, auto l_) {
    sparse_attention(q_, k_, v_, o_, test_pattern(N), p, l_);
  });
  check("block_sparse_attention", [&](auto q_, auto k_, auto v_, auto o_, auto l_) {
    block_sparse_attention(q_, k_, v_, o_, block_mask::causal(16, 32, N, N, 2, Hq), p, l_);
  });
  check("xattention_select + block_sparse_attention", [&](auto q_, auto k_, auto v_, auto o_, auto l_) {
    xattention_params xp;
    xp.block = 16;
    block_sparse_attention(q_, k_, v_, o_, xattention_select(q_, k_, xp), {}, l_);
  });
  auto oa = far.bshd(N, Hq, D), ob = far.bshd(N, Hq, D);
  auto la = far.bhs(Hq, N), lb = far.bhs(Hq, N);
  flash_attention(q, k.slice(1, 0, 30), v.slice(1, 0, 30), oa, {}, la);
  flash_attention(q, k.slice(1, 30, N), v.slice(1, 30, N), ob, {}, lb);
  compact<4> coa(oa), cob(ob);
  compact<3> cla(la), clb(lb);
  check("merge_attention_states", [&](auto q_, auto, auto, auto o_, auto l_) {
    const bool is_far = q_.stride(0) == far_batches::far_stride;
    merge_attention_states(is_far ? oa : coa.view, is_far ? la : cla.view, is_far ? ob : cob.view, is_far ? lb : clb.view,
                           o_, l_);
  });
  const favor_projection proj = make_favor_projection(16, D, 7);
  for (feature_map phi : {feature_map::elu_plus_one, feature_map::favor_positive})
    for (bool causal : {false, true})
      check(causal ? "linear_attention causal, then a step" : "linear_attention", [&](auto q_, auto k_, auto v_, auto o_, auto) {
        const linear_params lp = test::make_linear_params(phi, causal, true, nullptr, &proj);
        if (!causal) return linear_attention(q_, k_, v_, o_, lp);
        linear_attention_state st(2, Hq, linear_feature_dim(lp, D), D);
        linear_attention(q_.slice(1, 0, N - 1), q_.slice(1, 0, N - 1), q_.slice(1, 0, N - 1), o_.slice(1, 0, N - 1), lp, st);
        linear_attention_step(st, q_.slice(1, N - 1, N), q_.slice(1, N - 1, N), q_.slice(1, N - 1, N), o_.slice(1, N - 1, N), lp);
      });
  auto logits = far.bhs(Hq, N);
  compact<3> clogits(logits);
  for (int mode = 0; mode < 3; ++mode)
    check("averaged_key_logits + circular_attention", [&](auto q_, auto k_, auto, auto o_, auto) {
      const bool is_far = q_.stride(0) == far_batches::far_stride;
      const auto l = is_far ? logits : clogits.view;
      averaged_key_logits(q_, k_, l);
      circular_attention(l, q_, o_, test::mode_params(mode));
    });
#else
  SUCCEED("no mmap on this target");
#endif
}

TEST_CASE("key counts and positions beyond 2^32: broadcast keys with windows, against the closed form") {
  // Every key equals k_row and every value v_row (stride 0 on batch and sequence), so each row's
  // output is v_row and its lse is s_i + log(keys allowed to row i), s_i = scale * q_i . k_row.
  // Nq = 6 takes flash's decode path, Nq = 20 its prefill path; both visit only the keys inside the
  // rows' ranges.
  const index_t Nk = (index_t(1) << 32) + 7, D = 4;
  for (const index_t Nq : {index_t(6), index_t(20)}) {
  INFO("Nq = " << Nq);
  const float k_row[D] = {0.5f, -0.25f, 1.f, 0.125f}, v_row[D] = {1.f, -2.f, 0.5f, 3.f};
  const tensor_view<const float, 4> k(k_row, {1, Nk, 1, D}, {0, 0, 0, 1}), v(v_row, {1, Nk, 1, D}, {0, 0, 0, 1});
  tensor4<float> q(1, Nq, 1, D), out(1, Nq, 1, D);
  tensor3<float> lse(1, 1, Nq);
  test::fill_uniform(q, 90);
  struct setting {
    bool causal;
    index_t left, right, length;  // length: kv_lengths[0] (-1: none)
  };
  auto closed_form = [&](const char* name, const setting& st) {
    INFO(name << " causal=" << st.causal << " window " << st.left << "/" << st.right << " kv_length " << st.length);
    const index_t L = st.length < 0 ? Nk : st.length;
    for (index_t i = 0; i < Nq; ++i) {
      const index_t diag = i + L - Nq;
      index_t lo = 0, hi = L;
      if (st.causal) hi = std::min(hi, diag + 1);
      if (st.right >= 0) hi = std::min(hi, diag + st.right + 1);
      if (st.left >= 0) lo = std::max(lo, diag - st.left);
      double s = 0;
      for (index_t d = 0; d < D; ++d) s += double(q(0, i, 0, d)) * k_row[d] / 2.0;  // scale 1/sqrt(4)
      INFO("row " << i << ": " << hi - lo << " keys");
      CHECK(double(lse.view(0, 0, i)) == Approx(s + std::log(double(hi - lo))).margin(1e-5));
      for (index_t d = 0; d < D; ++d) CHECK(out(0, i, 0, d) == Approx(v_row[d]).epsilon(1e-6));
    }
  };
  const setting settings[] = {{true, 5, -1, -1}, {false, 6, 2, -1}, {true, 9, -1, Nk - 100}, {false, 3, 3, (index_t(1) << 32) + 2}};
  for (const auto& st : settings) {
    attention_params p;
    p.causal = st.causal;
    p.window_left = st.left;
    p.window_right = st.right;
    const index_t length = st.length;
    if (length >= 0) p.kv_lengths = &length;
    test::fill_value(out, -1.f);
    flash_attention(q.view, k, v, out.view, p, lse.view);
    closed_form("flash_attention", st);
    test::fill_value(out, -1.f);
    // The pattern and the mask are aligned with Nk, the params with kv_lengths (100 keys earlier):
    // both are wider than the params' window, which then decides.
    sparse_pattern pat;
    pat.window_left = 128;
    pat.window_right = 16;
    sparse_attention(q.view, k, v, out.view, pat, p, lse.view);
    closed_form("sparse_attention", st);
    test::fill_value(out, -1.f);
    block_sparse_attention(q.view, k, v, out.view, block_mask::local(16, 64, Nq, Nk, 3, 1), p, lse.view);
    closed_form("block_sparse_attention", st);
  }
  }
}

TEST_CASE("sizes whose element count overflows are rejected, not wrapped") {
  float x = 0.f;
  const index_t big = index_t(1) << 40;
  test::require_error([&] { (void)tensor_view<float, 4>(&x, {big, big, 1, 1}, {big, 1, 0, 0}); },
                      {"tensor_view", "extents and strides", "64-bit"});
  test::require_error([] { (void)linear_attention_state<float>(index_t(1) << 21, index_t(1) << 21, index_t(1) << 21, 4); },
                      {"linear_attention_state", "batch * heads * features * value_dim", "fits in index_t"});
  test::require_error([] { (void)linear_attention_state<float>(index_t(1) << 32, index_t(1) << 32, 1, 0); },
                      {"linear_attention_state", "fits in index_t"});
}
