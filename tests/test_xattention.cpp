// xattention_scores / xattention_select against their direct double-precision reference
// (reference_xattention_scores / reference_xattention_select), and the selection's guarantees.
// Scores are probabilities in [0, 1]: absolute tolerance 2e-5 for float accumulation (1e-12 for
// double). The fast selection uses float scores, so a query block whose reference cut lies within
// 1e-4 of the threshold (or whose order at the cut depends on a near tie) may legitimately differ;
// every other block row must match the reference exactly, and such ambiguous rows are counted.
#include "block_sparse_cases.hpp"

using namespace attnkit;
using test::attn_case;
using test::layout;
using test::tensor4;

namespace {

struct xcase {
  index_t B = 1, Nq = 256, Nk = 256, Hq = 2, Hkv = 1, D = 32;
  xattention_params xp{};
  layout lay = layout::bshd;
  float amp = 1.f;
  std::uint64_t seed = 1;
};

std::string describe(const xcase& c) {
  return detail::concat("B=", c.B, " Nq=", c.Nq, " Nk=", c.Nk, " Hq=", c.Hq, " Hkv=", c.Hkv, " D=", c.D,
                        " block=", c.xp.block, " stride=", c.xp.stride, " thr=", c.xp.threshold,
                        " causal=", c.xp.causal, " scale=", c.xp.scale, " layout=", test::layout_name(c.lay),
                        " amp=", c.amp, " seed=", c.seed);
}

template <class T>
struct qk {
  tensor4<T> q, k;
  explicit qk(const xcase& c) : q(c.B, c.Nq, c.Hq, c.D, c.lay), k(c.B, c.Nk, c.Hkv, c.D, c.lay) {
    test::fill_uniform(q, c.seed * 2 + 1, c.amp);
    test::fill_uniform(k, c.seed * 2 + 2, c.amp);
  }
};

index_t blocks(index_t n, index_t b) { return (n + b - 1) / b; }

struct score4 {
  std::vector<double> buf;
  tensor_view<double, 4> view;
  score4(index_t B, index_t H, index_t nqb, index_t nkb, double init = 0)
      : buf(std::size_t(std::max<index_t>(B * H * nqb * nkb, 1)), init),
        view(buf.data(), {B, H, nqb, nkb}, {H * nqb * nkb, nqb * nkb, nkb, 1}) {}
};

// A block row whose selection may flip under float rounding of the scores.
bool ambiguous(const double* sc, index_t nkb, double threshold) {
  std::vector<double> v(sc, sc + nkb);
  std::sort(v.begin(), v.end(), std::greater<>());
  double cum = 0;
  for (std::size_t i = 0; i < v.size(); ++i) {
    cum += v[i];
    if (std::abs(cum - threshold) < 1e-4) return true;
    if (i + 1 < v.size() && std::abs(v[i] - v[i + 1]) < 1e-5 && v[i] > 0) return true;
    if (cum >= threshold) break;
  }
  return false;
}

template <class T = float>
void check_scores(const xcase& c, double tol = 2e-5) {
  INFO(describe(c) << " dtype=" << element_name<T>());
  qk<T> in(c);
  const index_t nqb = blocks(c.Nq, c.xp.block), nkb = blocks(c.Nk, c.xp.block);
  score4 fast(c.B, c.Hq, nqb, nkb, -7), ref(c.B, c.Hq, nqb, nkb, -7);
  xattention_scores(in.q.cview(), in.k.cview(), fast.view, c.xp);
  reference_xattention_scores(in.q.cview(), in.k.cview(), ref.view, c.xp);
  double err = 0;
  bool finite = true;
  for (std::size_t i = 0; i < fast.buf.size(); ++i) {
    finite = finite && std::isfinite(fast.buf[i]);
    err = std::max(err, std::abs(fast.buf[i] - ref.buf[i]));
  }
  CHECK(finite);
  CHECK(err <= tol);
}

// The fast selection equals the reference one on every unambiguous block row.
template <class T = float>
void check_select(const xcase& c, index_t* ambiguous_rows = nullptr) {
  INFO(describe(c) << " dtype=" << element_name<T>());
  qk<T> in(c);
  const auto fast = xattention_select(in.q.cview(), in.k.cview(), c.xp);
  const auto ref = reference_xattention_select(in.q.cview(), in.k.cview(), c.xp);
  const index_t nqb = blocks(c.Nq, c.xp.block), nkb = blocks(c.Nk, c.xp.block);
  REQUIRE(fast.q_blocks() == nqb);
  REQUIRE(fast.k_blocks() == nkb);
  CHECK(fast.block_q() == c.xp.block);
  CHECK(fast.block_k() == c.xp.block);
  CHECK(fast.batch() == c.B);
  CHECK(fast.heads() == c.Hq);
  score4 sc(c.B, c.Hq, nqb, nkb);
  reference_xattention_scores(in.q.cview(), in.k.cview(), sc.view, c.xp);
  index_t amb = 0;
  for (index_t b = 0; b < c.B; ++b)
    for (index_t h = 0; h < c.Hq; ++h)
      for (index_t qb = 0; qb < nqb; ++qb) {
        const auto f = fast.active(b, h, qb), r = ref.active(b, h, qb);
        const bool same = std::equal(f.begin(), f.end(), r.begin(), r.end());
        if (same) continue;
        if (ambiguous(&sc.view(b, h, qb, 0), nkb, c.xp.threshold)) {
          ++amb;
          continue;
        }
        INFO("b=" << b << " h=" << h << " qb=" << qb);
        CHECK(same);
      }
  if (ambiguous_rows) *ambiguous_rows += amb;
}

}  // namespace

TEST_CASE("xattention_scores equals the direct reference") {
  std::vector<xcase> cs;
  auto add = [&](auto edit) {
    xcase c;
    edit(c);
    c.seed = cs.size() + 1;
    cs.push_back(c);
  };
  add([](xcase&) {});
  add([](xcase& c) { c.xp.causal = true; });
  add([](xcase& c) { c.Nq = 301; c.Nk = 411; c.xp.block = 64; c.xp.stride = 8; });          // partial groups and blocks
  add([](xcase& c) { c.Nq = 301; c.Nk = 411; c.xp.block = 64; c.xp.causal = true; });      // off = 110, not a multiple of s
  add([](xcase& c) { c.Nq = 400; c.Nk = 150; c.xp.block = 32; c.xp.stride = 4; c.xp.causal = true; });  // off < 0
  add([](xcase& c) { c.Nq = 200; c.Nk = 500; c.xp.block = 16; c.xp.stride = 16; });        // one group per block
  add([](xcase& c) { c.Nq = 300; c.Nk = 300; c.xp.block = 256; c.xp.stride = 2; c.D = 8; }); // 128 groups per block
  add([](xcase& c) { c.xp.stride = 1; c.xp.block = 40; c.Nq = 130; c.Nk = 170; c.D = 12; });
  add([](xcase& c) { c.Hq = 6; c.Hkv = 2; c.B = 2; c.Nk = 333; c.D = 20; c.lay = layout::bhsd; });
  add([](xcase& c) { c.lay = layout::padded; c.xp.causal = true; c.amp = 2.f; c.xp.scale = 0.5f; });
  add([](xcase& c) { c.lay = layout::strided; c.Nq = 99; c.Nk = 1000; c.xp.block = 48; c.xp.stride = 6; });
  add([](xcase& c) { c.Nk = 2100; c.xp.block = 32; c.xp.causal = true; c.amp = 1.5f; });     // several key chunks
  for (const auto& c : cs) {
    check_scores<float>(c);
    check_scores<bf16>(c);
  }
  for (std::size_t i : {std::size_t(2), std::size_t(4), std::size_t(8)}) {
    check_scores<f16>(cs[i]);
    check_scores<double>(cs[i], 1e-12);
  }
}

TEST_CASE("xattention_select equals the direct reference") {
  index_t amb = 0, rows = 0;
  std::uint64_t seed = 50;
  for (float thr : {0.2f, 0.6f, 0.9f, 0.97f, 1.f})
    for (bool causal : {false, true})
      for (auto [nq, nk] : {std::pair<index_t, index_t>{512, 512}, {300, 777}, {640, 200}}) {
        xcase c;
        c.Nq = nq;
        c.Nk = nk;
        c.Hq = 2;
        c.D = 32;
        c.amp = 2.f;  // peaked enough that thresholds below 1 select a strict subset
        c.xp.block = 32;
        c.xp.stride = 8;
        c.xp.threshold = thr;
        c.xp.causal = causal;
        c.seed = ++seed;
        check_select(c, &amb);
        rows += c.Hq * blocks(nq, 32);
      }
  xcase g;  // GQA, double inputs
  g.B = 2;
  g.Hq = 4;
  g.Hkv = 2;
  g.Nq = 150;
  g.Nk = 260;
  g.xp.block = 16;
  g.xp.stride = 4;
  g.xp.threshold = 0.5f;
  g.amp = 2.f;
  check_select<double>(g, &amb);
  check_select<bf16>(g, &amb);
  INFO("ambiguous rows " << amb << " of " << rows);
  CHECK(amb * 50 <= rows);
  WARN("xattention_select vs reference: " << amb << " ambiguous block rows of " << rows);
}

TEST_CASE("xattention_select: threshold 1 keeps every reachable block") {
  for (bool causal : {false, true})
    for (auto [nq, nk] : {std::pair<index_t, index_t>{256, 256}, {200, 328}, {300, 120}}) {
      xcase c;
      c.Nq = nq;
      c.Nk = nk;
      c.amp = 4.f;  // very peaked: most blocks carry almost no mass
      c.xp.block = 32;
      c.xp.stride = 8;
      c.xp.threshold = 1.f;
      c.xp.causal = causal;
      INFO(describe(c));
      qk<float> in(c);
      const auto m = xattention_select(in.q.cview(), in.k.cview(), c.xp);
      // Nk - Nq is a multiple of the stride here, so the strided causal cut and the block causal
      // mask coincide.
      const auto want = causal ? block_mask::causal(32, 32, nq, nk) : block_mask::full(32, 32, nq, nk);
      for (index_t h = 0; h < c.Hq; ++h)
        for (index_t qb = 0; qb < m.q_blocks(); ++qb)
          for (index_t kb = 0; kb < m.k_blocks(); ++kb) CHECK(m.is_active(0, h, qb, kb) == want.is_active(0, h, qb, kb));
      // And at 0.5 the same peaked input keeps fewer.
      c.xp.threshold = 0.5f;
      CHECK(xattention_select(in.q.cview(), in.k.cview(), c.xp).density() < m.density());
    }
}

TEST_CASE("xattention_select: no future block when causal, diagonal and sink always kept") {
  for (float thr : {1e-6f, 0.3f, 0.9f, 1.f})
    for (auto [nq, nk] : {std::pair<index_t, index_t>{256, 256}, {200, 333}, {333, 200}, {100, 1000}}) {
      xcase c;
      c.Nq = nq;
      c.Nk = nk;
      c.amp = 2.f;
      c.xp.block = 64;
      c.xp.stride = 16;
      c.xp.threshold = thr;
      c.xp.causal = true;
      c.seed = std::uint64_t(nq * 7 + nk);
      INFO(describe(c));
      qk<float> in(c);
      const index_t off = nk - nq, B = c.xp.block;
      for (bool causal : {true, false}) {
        c.xp.causal = causal;
        const auto m = xattention_select(in.q.cview(), in.k.cview(), c.xp);
        for (index_t h = 0; h < c.Hq; ++h)
          for (index_t qb = 0; qb < m.q_blocks(); ++qb) {
            const index_t first = qb * B, last = std::min(nq, first + B) - 1;
            for (index_t kb = 0; kb < m.k_blocks(); ++kb) {
              if (causal && m.is_active(0, h, qb, kb)) CHECK(kb * B <= last + off);  // not wholly in the future
            }
            for (index_t i = first; i <= last; ++i)
              if (i + off >= 0) CHECK(m.is_active(0, h, qb, (i + off) / B));
            if (!causal || last + off >= 0) CHECK(m.is_active(0, h, qb, 0));
          }
        if (thr < 1e-3f) {  // a tiny threshold keeps the top block, the diagonal and the sink only
          for (index_t qb = 0; qb < m.q_blocks(); ++qb) {
            index_t n = 0;
            for (const auto& r : m.active(0, 0, qb)) n += r.end - r.begin;
            CHECK(n <= 4);
          }
        }
      }
    }
}

TEST_CASE("xattention_select: density grows with the threshold, selections nested") {
  xcase c;
  c.Nq = 1024;
  c.Nk = 1024;
  c.Hq = 2;
  c.D = 32;
  c.amp = 1.5f;
  c.xp.block = 64;
  c.xp.stride = 8;
  qk<float> in(c);
  for (bool causal : {false, true}) {
    c.xp.causal = causal;
    block_mask prev;
    double prev_density = -1;
    for (float thr : {0.05f, 0.2f, 0.4f, 0.6f, 0.8f, 0.9f, 0.95f, 0.99f, 1.f}) {
      c.xp.threshold = thr;
      const auto m = xattention_select(in.q.cview(), in.k.cview(), c.xp);
      INFO(describe(c) << " density " << m.density());
      CHECK(m.density() >= prev_density);
      if (prev_density >= 0)
        for (index_t h = 0; h < 2; ++h)
          for (index_t qb = 0; qb < m.q_blocks(); ++qb)
            for (index_t kb = 0; kb < m.k_blocks(); ++kb)
              if (prev.is_active(0, h, qb, kb)) CHECK(m.is_active(0, h, qb, kb));
      prev_density = m.density();
      prev = m;
    }
    CHECK(prev_density == Approx(causal ? block_mask::causal(64, 64, 1024, 1024).density() : 1.0));
  }
}

TEST_CASE("xattention_select finds a planted block and feeds block_sparse_attention") {
  // Every query points along e_0; the keys of key block 5 point along e_0 too, the others are small
  // noise: the attention mass of every query block sits in key block 5.
  attn_case c;
  c.Nq = 384;
  c.Nk = 512;
  c.Hq = 2;
  c.D = 16;
  xcase x;
  x.Nq = c.Nq;
  x.Nk = c.Nk;
  x.D = c.D;
  x.xp.block = 64;
  x.xp.stride = 8;
  x.xp.threshold = 0.8f;
  qk<float> in(x);
  for (auto* t : {&in.q, &in.k}) test::fill_uniform(*t, t == &in.q ? 3 : 4, 0.05f);
  for (index_t i = 0; i < c.Nq; ++i)
    for (index_t h = 0; h < c.Hq; ++h) in.q(0, i, h, 0) += 6.f;
  for (index_t j = 5 * 64; j < 6 * 64; ++j) in.k(0, j, 0, 0) += 6.f;
  const auto m = xattention_select(in.q.cview(), in.k.cview(), x.xp);
  const index_t off = c.Nk - c.Nq;
  for (index_t h = 0; h < c.Hq; ++h)
    for (index_t qb = 0; qb < m.q_blocks(); ++qb) {
      std::vector<index_t> want{0, 5};
      for (index_t kb = (qb * 64 + off) / 64; kb <= (qb * 64 + 63 + off) / 64; ++kb) want.push_back(kb);
      std::sort(want.begin(), want.end());
      want.erase(std::unique(want.begin(), want.end()), want.end());
      std::vector<index_t> got;
      for (const auto& r : m.active(0, h, qb))
        for (index_t kb = r.begin; kb < r.end; ++kb) got.push_back(kb);
      INFO("qb=" << qb);
      CHECK(got == want);
    }
  // The selected mask drives block_sparse_attention exactly like a dense grid would.
  x.xp.threshold = 0.9f;
  x.amp = 2.f;
  qk<float> rnd(x);
  c.p.causal = true;
  x.xp.causal = true;
  test::check_masked(c, xattention_select(rnd.q.cview(), rnd.k.cview(), x.xp));
}

TEST_CASE("xattention_select: NaN in a query row keeps every reachable block of its query block only") {
  xcase c;
  c.Nq = 256;
  c.Nk = 256;
  c.amp = 2.f;
  c.xp.block = 32;
  c.xp.threshold = 0.5f;
  qk<float> in(c);
  const auto clean = xattention_select(in.q.cview(), in.k.cview(), c.xp);
  in.q(0, 100, 1, 3) = std::numeric_limits<float>::quiet_NaN();  // head 1, query block 3
  for (bool causal : {false, true}) {
    c.xp.causal = causal;
    const auto m = xattention_select(in.q.cview(), in.k.cview(), c.xp);
    const auto ref = reference_xattention_select(in.q.cview(), in.k.cview(), c.xp);
    for (index_t kb = 0; kb < 8; ++kb) {
      CHECK(m.is_active(0, 1, 3, kb) == (!causal || kb <= 3));
      CHECK(ref.is_active(0, 1, 3, kb) == m.is_active(0, 1, 3, kb));
    }
    if (!causal)
      for (index_t h = 0; h < 2; ++h)
        for (index_t qb = 0; qb < 8; ++qb) {
          if (h == 1 && qb == 3) continue;
          const auto a = m.active(0, h, qb), b = clean.active(0, h, qb);
          CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
        }
  }
}

TEST_CASE("xattention validates input and writes nothing on failure") {
  xcase c;
  c.Nq = 64;
  c.Nk = 96;
  c.Hq = 4;
  c.Hkv = 2;
  qk<float> in(c);
  score4 sc(1, 4, 4, 6, 42.0);  // blocks of 16
  const std::vector<double> before = sc.buf;
  auto both = [&](xattention_params p, std::initializer_list<std::string> parts) {
    test::require_error([&] { xattention_select(in.q.cview(), in.k.cview(), p); }, parts);
    test::require_error([&] { xattention_scores(in.q.cview(), in.k.cview(), sc.view, p); }, parts);
  };
  xattention_params p;
  p.block = 16;
  p.stride = 6;
  both(p, {"params.block", "multiple of params.stride 6", "got 16"});
  p.stride = 0;
  both(p, {"params.stride", ">= 1"});
  p = {};
  p.block = 0;
  both(p, {"params.block"});
  p = {};
  p.block = 16;
  for (float t : {0.f, -0.5f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
    p.threshold = t;
    both(p, {"params.threshold", "(0, 1]"});
  }
  p.threshold = 0.9f;
  p.scale = std::numeric_limits<float>::infinity();
  both(p, {"params.scale"});
  p.scale = 0.f;
  tensor4<float> k_bad(1, 96, 3, 32), k_d(1, 96, 2, 31);
  test::require_error([&] { xattention_select(in.q.cview(), k_bad.cview(), p); }, {"xattention_select", "k", "dividing"});
  test::require_error([&] { xattention_scores(in.q.cview(), k_d.cview(), sc.view, p); }, {"xattention_scores", "k", "head_dim"});
  score4 wrong(1, 4, 4, 5);
  test::require_error([&] { xattention_scores(in.q.cview(), in.k.cview(), wrong.view, p); },
                      {"xattention_scores", "scores", "(1, 4, 4, 6)"});
  CHECK(sc.buf == before);
  xattention_scores(in.q.cview(), in.k.cview(), sc.view, p);  // and the valid call writes
  CHECK(sc.buf != before);
}

TEST_CASE("xattention: bitwise identical results for 1 and 2 threads") {
#if defined(_OPENMP)
  xcase c;
  c.B = 2;
  c.Nq = 700;
  c.Nk = 1300;
  c.Hq = 4;
  c.Hkv = 2;
  c.D = 48;
  c.xp.block = 64;
  c.xp.stride = 8;
  c.xp.causal = true;
  c.amp = 2.f;
  qk<float> in(c);
  score4 s1(2, 4, 11, 21), s2(2, 4, 11, 21);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  xattention_scores(in.q.cview(), in.k.cview(), s1.view, c.xp);
  const auto m1 = xattention_select(in.q.cview(), in.k.cview(), c.xp);
  omp_set_num_threads(2);
  xattention_scores(in.q.cview(), in.k.cview(), s2.view, c.xp);
  const auto m2 = xattention_select(in.q.cview(), in.k.cview(), c.xp);
  omp_set_num_threads(saved);
  CHECK(std::memcmp(s1.buf.data(), s2.buf.data(), s1.buf.size() * sizeof(double)) == 0);
  CHECK(m1.active_tiles() == m2.active_tiles());
  for (index_t b = 0; b < 2; ++b)
    for (index_t h = 0; h < 4; ++h)
      for (index_t qb = 0; qb < 11; ++qb) {
        const auto r1 = m1.active(b, h, qb), r2 = m2.active(b, h, qb);
        CHECK(std::equal(r1.begin(), r1.end(), r2.begin(), r2.end()));
      }
#else
  WARN("built without OpenMP: nothing to compare");
  SUCCEED();
#endif
}
