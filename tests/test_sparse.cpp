// sparse_attention and to_csr. sparse_attention is compared with reference_attention run with an
// additive 0 / -inf bias built from to_csr (per query head), in double precision; to_csr is
// compared with a brute-force predicate written from the definition in sparse_pattern's comment.
// Tolerances as in test_flash: max |out - ref| / max |ref| <= 2e-5 for float, bf16 and f16 inputs,
// 1e-12 for double; log-sum-exp absolute error <= 2e-5 (float) / 1e-12 (double).
#include "flash_cases.hpp"

#include <attnkit/ops/sparse.hpp>

#include <map>
#include <set>

using namespace attnkit;
using test::attn_case;
using test::layout;
using test::tensor3;
using test::tensor4;

namespace {

constexpr double tol_f = 2e-5, tol_d = 1e-12;

// Dense allowed[h][i][j] of one pattern, from to_csr per query head.
struct dense_mask {
  index_t nq = 0, nk = 0;
  std::vector<char> m;
  bool operator()(index_t h, index_t i, index_t j) const { return m[std::size_t((h * nq + i) * nk + j)] != 0; }
};

dense_mask mask_of(const std::vector<csr_pattern>& per_head, index_t nq, index_t nk) {
  dense_mask d{nq, nk, std::vector<char>(std::size_t(std::max<index_t>(index_t(per_head.size()) * nq * nk, 1)), 0)};
  for (std::size_t h = 0; h < per_head.size(); ++h)
    for (index_t i = 0; i < nq; ++i)
      for (index_t t = per_head[h].row_ptr[std::size_t(i)]; t < per_head[h].row_ptr[std::size_t(i + 1)]; ++t)
        d.m[std::size_t((index_t(h) * nq + i) * nk + per_head[h].col_idx[std::size_t(t)])] = 1;
  return d;
}

dense_mask mask_of(const sparse_pattern& pat, index_t hq, index_t nq, index_t nk) {
  std::vector<csr_pattern> per_head;
  for (index_t h = 0; h < hq; ++h) per_head.push_back(to_csr(pat, nq, nk, h));
  return mask_of(per_head, nq, nk);
}

dense_mask mask_of(const csr_pattern& c, index_t hq, index_t nq, index_t nk) {
  return mask_of(std::vector<csr_pattern>(std::size_t(hq), c), nq, nk);
}

template <class T = float, class O = float, class Pattern>
void check(const attn_case& c, const Pattern& pat, double tol = tol_f) {
  INFO(test::describe(c) << " dtype=" << element_name<T>());
  const dense_mask m = mask_of(pat, c.Hq, c.Nq, c.Nk);
  const auto r = test::run_against_reference_masked<T, O>(
      c, [&](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) { sparse_attention(q, k, v, out, pat, p, lse); },
      [&](index_t, index_t h, index_t i, index_t j) { return m(h, i, j); });
  CHECK_FALSE(r.out.mismatched_nonfinite);
  CHECK(r.out.rel() <= tol);
  CHECK(r.lse_err <= tol);
}

// The definition of windows, dilation, global tokens and extra, pair by pair.
bool brute_allowed(const sparse_pattern& p, index_t nq, index_t nk, index_t i, index_t j) {
  const index_t pos = i + nk - nq, delta = j - pos;
  index_t left = 0, right = 0;  // overflowing products mean "unbounded"
  if (__builtin_mul_overflow(p.window_left, p.dilation, &left)) left = std::numeric_limits<index_t>::max();
  if (__builtin_mul_overflow(p.window_right, p.dilation, &right)) right = std::numeric_limits<index_t>::max();
  if (delta >= -left && delta <= right && delta % p.dilation == 0) return true;
  for (index_t g : p.global_tokens)
    if (g == pos || g == j) return true;
  if (p.extra) {
    const auto& c = *p.extra;
    return std::binary_search(c.col_idx.begin() + c.row_ptr[std::size_t(i)], c.col_idx.begin() + c.row_ptr[std::size_t(i + 1)], j);
  }
  return false;
}

// A random explicit pattern with about `density` of the pairs, some rows empty.
csr_pattern random_csr(index_t nq, index_t nk, double density, std::uint64_t seed) {
  auto g = test::rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  csr_pattern c;
  c.row_ptr.push_back(0);
  for (index_t i = 0; i < nq; ++i) {
    if (i % 11 != 5)
      for (index_t j = 0; j < nk; ++j)
        if (u(g) < density) c.col_idx.push_back(j);
    c.row_ptr.push_back(index_t(c.col_idx.size()));
  }
  return c;
}

std::set<index_t> row_set(const csr_pattern& c, index_t i) {
  return {c.col_idx.begin() + c.row_ptr[std::size_t(i)], c.col_idx.begin() + c.row_ptr[std::size_t(i + 1)]};
}

}  // namespace

TEST_CASE("to_csr: windows, dilation, global tokens and extra match the definition pair by pair") {
  const csr_pattern extra = random_csr(150, 150, 0.02, 3);
  std::vector<sparse_pattern> pats;
  for (index_t wl : {0, 1, 7, 40})
    for (index_t wr : {0, 3, 25})
      for (index_t d : {1, 2, 3, 5, 70}) {
        sparse_pattern p;
        p.window_left = wl;
        p.window_right = wr;
        p.dilation = d;
        pats.push_back(p);
      }
  {
    sparse_pattern p;
    p.window_left = 4;
    p.window_right = 4;
    p.global_tokens = {0, 77, 3, 149, 77};  // unsorted, duplicated
    pats.push_back(p);
    p.dilation = 3;
    pats.push_back(p);
    p.window_left = std::numeric_limits<index_t>::max() / 2;  // saturates, no overflow
    pats.push_back(p);
  }
  for (auto [nq, nk] : {std::pair<index_t, index_t>{150, 150}, {37, 150}, {150, 61}, {1, 150}, {150, 1}}) {
    for (auto p : pats) {
      std::vector<index_t> gs;
      for (index_t g : p.global_tokens)
        if (g < nk) gs.push_back(g);
      p.global_tokens = gs;
      for (bool with_extra : {false, true}) {
        if (with_extra && (nq != 150 || nk != 150)) continue;
        p.extra = with_extra ? &extra : nullptr;
        INFO("Nq=" << nq << " Nk=" << nk << " wl=" << p.window_left << " wr=" << p.window_right << " d=" << p.dilation
                   << " globals=" << p.global_tokens.size() << " extra=" << with_extra);
        const csr_pattern c = to_csr(p, nq, nk, 0);
        REQUIRE(c.row_ptr.size() == std::size_t(nq + 1));
        bool ok = true;
        for (index_t i = 0; i < nq && ok; ++i) {
          const auto s = row_set(c, i);
          ok = std::is_sorted(c.col_idx.begin() + c.row_ptr[std::size_t(i)], c.col_idx.begin() + c.row_ptr[std::size_t(i + 1)]) &&
               s.size() == std::size_t(c.row_ptr[std::size_t(i + 1)] - c.row_ptr[std::size_t(i)]);
          for (index_t j = 0; j < nk && ok; ++j) {
            ok = brute_allowed(p, nq, nk, i, j) == (s.count(j) == 1);
            if (!ok) INFO("first mismatch at i=" << i << " j=" << j);
          }
        }
        CHECK(ok);
      }
    }
  }
}

TEST_CASE("to_csr: random blocks are whole, distinct, deterministic per seed and vary by block and head") {
  const index_t N = 300, bs = 16, nkb = (N + bs - 1) / bs;  // last key block is partial (12 keys)
  sparse_pattern p;
  p.block_size = bs;
  p.random_blocks = 3;
  p.seed = 42;
  const csr_pattern a = to_csr(p, N, N, 0), again = to_csr(p, N, N, 0);
  CHECK(a.row_ptr == again.row_ptr);
  CHECK(a.col_idx == again.col_idx);
  p.seed = 43;
  CHECK(to_csr(p, N, N, 0).col_idx != a.col_idx);
  p.seed = 42;
  CHECK(to_csr(p, N, N, 1).col_idx != a.col_idx);

  std::map<index_t, std::vector<index_t>> per_qblock;
  for (index_t i = 0; i < N; ++i) {
    auto s = row_set(a, i);
    s.erase(i);  // the window 0 0 part: the diagonal
    // Each row sees exactly 3 distinct whole key blocks; the rows of a query block the same ones.
    std::vector<index_t> blocks;
    for (index_t kb = 0; kb < nkb; ++kb) {
      index_t present = 0;
      const index_t k1 = std::min(N, (kb + 1) * bs);
      for (index_t j = kb * bs; j < k1; ++j) present += index_t(s.count(j) == 1 || j == i);
      if (present == k1 - kb * bs) blocks.push_back(kb);
      else CHECK((present == 0 || (present == 1 && i / bs == kb)));
    }
    INFO("row " << i);
    CHECK(blocks.size() == 3);
    if (i % bs == 0) per_qblock[i / bs] = blocks;
    else CHECK(per_qblock[i / bs] == blocks);
  }
  std::set<std::vector<index_t>> draws;
  for (const auto& [qb, blocks] : per_qblock) draws.insert(blocks);
  CHECK(draws.size() > std::size_t(nkb) / 2);  // not the same draw for every query block

  // More random blocks than key blocks: every key block.
  p.random_blocks = 100;
  const csr_pattern all = to_csr(p, 40, 40, 2);
  CHECK(all.col_idx.size() == 40u * 40u);
  // Query blocks follow the aligned positions: a single query row (decode) sees the draw of the
  // block of its position Nk - 1, as the last row of a full prefill does.
  p.random_blocks = 2;
  const csr_pattern full = to_csr(p, N, N, 1), last = to_csr(p, 1, N, 1);
  CHECK(row_set(last, 0) == row_set(full, N - 1));
}

TEST_CASE("sparse: every pattern kind alone and combined, causal and not, Nq != Nk") {
  const csr_pattern extra_sq = random_csr(130, 130, 0.05, 7), extra_wide = random_csr(50, 200, 0.05, 8),
                    extra_tall = random_csr(200, 50, 0.1, 9);
  for (auto [nq, nk] : {std::pair<index_t, index_t>{130, 130}, {50, 200}, {200, 50}}) {
    const csr_pattern* extra = nq == 130 ? &extra_sq : nq == 50 ? &extra_wide : &extra_tall;
    std::vector<sparse_pattern> pats(7);
    pats[0].window_left = 20;  // window
    pats[0].window_right = 5;
    pats[1].window_left = 6;  // dilated window
    pats[1].window_right = 6;
    pats[1].dilation = 3;
    pats[2].global_tokens = {0, 1, nk / 2, nk - 1};  // global tokens (and the diagonal)
    pats[3].block_size = 32;                          // BigBird random blocks (and the diagonal)
    pats[3].random_blocks = 2;
    pats[3].seed = 5;
    pats[4].extra = extra;  // explicit pattern (and the diagonal)
    pats[5] = pats[1];      // all combined
    pats[5].global_tokens = pats[2].global_tokens;
    pats[5].block_size = 16;
    pats[5].random_blocks = 2;
    pats[5].extra = extra;
    pats[6].window_left = 3;  // BigBird-like: window + globals + random
    pats[6].window_right = 3;
    pats[6].global_tokens = {0, 2};
    pats[6].block_size = 8;
    pats[6].random_blocks = 3;
    pats[6].seed = 99;
    for (const auto& pat : pats)
      for (bool causal : {false, true}) {
        attn_case c;
        c.B = 2;
        c.Nq = nq;
        c.Nk = nk;
        c.Hq = 2;
        c.D = 24;
        c.p.causal = causal;
        c.seed = std::uint64_t(nq + nk);
        check(c, pat);
      }
    // The explicit-pattern overload alone.
    for (bool causal : {false, true}) {
      attn_case c;
      c.Nq = nq;
      c.Nk = nk;
      c.Hq = 2;
      c.D = 16;
      c.p.causal = causal;
      check(c, *extra);
    }
  }
}

TEST_CASE("sparse: grouped-query heads, per-head random blocks, value dim != head dim") {
  sparse_pattern pat;
  pat.window_left = 10;
  pat.global_tokens = {3};
  pat.block_size = 32;
  pat.random_blocks = 2;
  for (index_t ratio : {1, 4}) {
    attn_case c;
    c.B = 2;
    c.Nq = 150;
    c.Nk = 170;
    c.Hkv = 2;
    c.Hq = 2 * ratio;
    c.D = 32;
    c.Dv = 20;
    check(c, pat);
  }
}

TEST_CASE("sparse: attention_params restrict and modify the pattern as in flash") {
  const index_t nq = 100, nk = 120;
  sparse_pattern pat;
  pat.window_left = 15;
  pat.window_right = 15;
  pat.dilation = 2;
  pat.global_tokens = {0, 60};
  pat.block_size = 16;
  pat.random_blocks = 1;
  attn_case base;
  base.B = 2;
  base.Nq = nq;
  base.Nk = nk;
  base.Hq = 4;
  base.Hkv = 2;
  base.D = 20;
  test::case_table cs{base};
  cs.add([](attn_case& c) { c.p.window_left = 7; c.p.window_right = 40; });
  cs.add([](attn_case& c) { c.p.causal = true; c.p.window_left = 30; });
  cs.add([](attn_case& c) { c.p.softcap = 1.5f; c.q_amp = 4.f; });
  cs.add([&](attn_case& c) {
    c.bias_extents = {c.B, c.Hq, nq, nk};
    c.bias_data = test::random_bias(std::size_t(c.B * c.Hq * nq * nk), 5, true);
  });
  cs.add([&](attn_case& c) {
    c.bias_extents = {1, c.Hq, 1, nk};
    c.bias_data = test::random_bias(std::size_t(c.Hq * nk), 6, false);
  });
  cs.add([](attn_case& c) { c.slopes = {0.5f, 0.25f, 0.125f, 0.0625f}; });
  cs.add([](attn_case& c) { c.lengths = {120, 37}; c.p.causal = true; });
  cs.add([](attn_case& c) { c.lengths = {0, 90}; });
  cs.add([&](attn_case& c) {
    c.p.causal = true;
    c.p.window_left = 40;
    c.p.softcap = 3.f;
    c.slopes = {0.3f, 0.2f, 0.1f, 0.05f};
    c.lengths = {100, 120};
    c.bias_extents = {c.B, 1, nq, nk};
    c.bias_data = test::random_bias(std::size_t(c.B * nq * nk), 7, true);
  });
  for (const auto& c : cs.cases) check(c, pat);
}

TEST_CASE("sparse: BHSD, padded and strided views") {
  sparse_pattern pat;
  pat.window_left = 9;
  pat.window_right = 2;
  pat.global_tokens = {5};
  pat.block_size = 8;
  pat.random_blocks = 2;
  for (auto lay : {layout::bhsd, layout::padded, layout::strided})
    for (index_t nq : {3, 70}) {
      attn_case c;
      c.B = 2;
      c.Nq = nq;
      c.Nk = 77;
      c.Hq = 4;
      c.Hkv = 2;
      c.D = 19;
      c.lay = lay;
      c.p.causal = true;
      check(c, pat);
      check<bf16>(c, pat);
    }
}

TEST_CASE("sparse: bf16, f16 and double inputs") {
  sparse_pattern pat;
  pat.window_left = 40;
  pat.window_right = 8;
  pat.dilation = 2;
  pat.global_tokens = {0, 100};
  pat.block_size = 32;
  pat.random_blocks = 2;
  const csr_pattern explicit_pat = random_csr(100, 260, 0.1, 4);
  for (index_t nq : {1, 100}) {
    attn_case c;
    c.B = 2;
    c.Nq = nq;
    c.Nk = 260;
    c.Hq = 4;
    c.Hkv = 1;
    c.D = 64;
    c.p.causal = nq > 1;
    check<bf16>(c, pat);
    check<f16>(c, pat);
    check<double, double>(c, pat, tol_d);
    if (nq == 100) {
      check<bf16>(c, explicit_pat);
      check<double, double>(c, explicit_pat, tol_d);
    }
  }
}

TEST_CASE("sparse: a sliding window equals flash_attention's window on a long sequence") {
  const index_t N = 6000, H = 2, D = 32;
  tensor4<float> q(1, N, H, D), k(1, N, H, D), v(1, N, H, D), o_sparse(1, N, H, D), o_flash(1, N, H, D);
  test::fill_uniform(q, 1);
  test::fill_uniform(k, 2);
  test::fill_uniform(v, 3);
  tensor3<float> l_sparse(1, H, N), l_flash(1, H, N);
  sparse_pattern pat;
  pat.window_left = 130;
  pat.window_right = 17;
  sparse_attention(q.view, k.view, v.view, o_sparse.view, pat, {}, l_sparse.view);
  attention_params fp;
  fp.window_left = 130;
  fp.window_right = 17;
  flash_attention(q.view, k.view, v.view, o_flash.view, fp, l_flash.view);
  CHECK(test::compare(o_sparse.view, o_flash.view).rel() <= tol_f);
  CHECK(test::lse_abs_error(l_sparse.view, l_flash.view) <= tol_f);
}

TEST_CASE("sparse: fully masked rows give 0 and lse -inf") {
  // Nq > Nk with window 0: the first Nq - Nk rows sit before key 0; kv_lengths 0 masks a batch;
  // the explicit pattern has empty rows.
  sparse_pattern pat;
  attn_case c;
  c.B = 2;
  c.Nq = 70;
  c.Nk = 20;
  c.lengths = {20, 0};
  check(c, pat);
  attn_case e;
  e.Nq = 60;
  e.Nk = 30;
  const csr_pattern explicit_pat = random_csr(60, 30, 0.2, 5);  // rows 5, 16, 27, 38, 49 empty
  check(e, explicit_pat);
  tensor4<float> q(1, 60, 1, 16), k(1, 30, 1, 16), v(1, 30, 1, 16), out(1, 60, 1, 16);
  test::fill_uniform(q, 1);
  test::fill_uniform(k, 2);
  test::fill_uniform(v, 3);
  tensor3<float> lse(1, 1, 60);
  sparse_attention(q.view, k.view, v.view, out.view, explicit_pat, {}, lse.view);
  for (index_t i = 5; i < 60; i += 11) {
    CHECK(lse.view(0, 0, i) == -std::numeric_limits<float>::infinity());
    for (index_t d = 0; d < 16; ++d) CHECK(out(0, i, 0, d) == 0.f);
  }
}

TEST_CASE("sparse: NaN in a key reaches only the rows whose pattern contains it") {
  tensor4<float> q(1, 100, 1, 8), k(1, 100, 1, 8), v(1, 100, 1, 8), out(1, 100, 1, 8);
  test::fill_uniform(q, 1);
  test::fill_uniform(k, 2);
  test::fill_uniform(v, 3);
  k(0, 50, 0, 2) = std::numeric_limits<float>::quiet_NaN();
  sparse_pattern pat;
  pat.window_left = 3;
  sparse_attention(q.view, k.view, v.view, out.view, pat);
  for (index_t i = 0; i < 100; ++i) CHECK(std::isnan(out(0, i, 0, 0)) == (i >= 50 && i <= 53));
}

TEST_CASE("sparse: empty batch, empty queries and empty keys") {
  sparse_pattern pat;
  pat.window_left = 3;
  tensor4<float> q(1, 4, 1, 8), k(1, 0, 1, 8), v(1, 0, 1, 8), out(1, 4, 1, 8);
  test::fill_uniform(q, 1);
  tensor3<float> lse(1, 1, 4);
  sparse_attention(q.view, k.view, v.view, out.view, pat, {}, lse.view);
  for (index_t i = 0; i < 4; ++i) {
    CHECK(lse.view(0, 0, i) == -std::numeric_limits<float>::infinity());
    CHECK(out(0, i, 0, 7) == 0.f);
  }
  tensor4<float> q0(1, 0, 1, 8), o0(1, 0, 1, 8), kk(1, 5, 1, 8), vv(1, 5, 1, 8);
  sparse_attention(q0.view, kk.view, vv.view, o0.view, pat);
  csr_pattern none;
  none.row_ptr = {0};
  sparse_attention(q0.view, kk.view, vv.view, o0.view, none);
  tensor4<float> qb(0, 4, 1, 8), kb(0, 5, 1, 8), vb(0, 5, 1, 8), ob(0, 4, 1, 8);
  sparse_attention(qb.view, kb.view, vb.view, ob.view, pat);
  CHECK(to_csr(pat, 0, 0, 0).row_ptr == std::vector<index_t>{0});
}

TEST_CASE("sparse: bitwise identical results for 1 and 2 threads") {
#if defined(_OPENMP)
  sparse_pattern pat;
  pat.window_left = 100;
  pat.window_right = 20;
  pat.dilation = 2;
  pat.global_tokens = {0, 7, 999};
  pat.block_size = 64;
  pat.random_blocks = 3;
  const csr_pattern explicit_pat = random_csr(300, 2000, 0.01, 6);
  for (index_t nq : {300, 2000}) {
    tensor4<float> q(2, nq, 4, 40), k(2, 2000, 2, 40), v(2, 2000, 2, 40), o1(2, nq, 4, 40), o2(2, nq, 4, 40);
    test::fill_uniform(q, 1);
    test::fill_uniform(k, 2);
    test::fill_uniform(v, 3);
    tensor3<float> l1(2, 4, nq), l2(2, 4, nq);
    attention_params p;
    p.causal = true;
    const int saved = omp_get_max_threads();
    for (int pass = 0; pass < 2; ++pass) {
      auto run = [&](auto& o, auto& l) {
        if (pass == 0) sparse_attention(q.view, k.view, v.view, o.view, pat, p, l.view);
        else if (nq == 300) sparse_attention(q.view, k.view, v.view, o.view, explicit_pat, p, l.view);
      };
      if (pass == 1 && nq != 300) continue;
      omp_set_num_threads(1);
      run(o1, l1);
      omp_set_num_threads(2);
      run(o2, l2);
      omp_set_num_threads(saved);
      CHECK(std::memcmp(o1.buf.data(), o2.buf.data(), o1.buf.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(l1.buf.data(), l2.buf.data(), l1.buf.size() * sizeof(float)) == 0);
    }
  }
#else
  WARN("built without OpenMP: nothing to compare");
  SUCCEED();
#endif
}

// Groups of work blocks whose keys are staged together (detail::group_blocks), and groups copying
// the rows they share with the previous group of their chunk from its staging, must give exactly the
// bits of blocks run one by one from the tensors (group 1): the same tiles on the same values.
// Mixed within one call: groups whose union exceeds a small staging limit run unstaged between
// staged ones, groups of 3 or 2 blocks make chunks cross heads (no reuse there), and short runs of
// the dilated window and the explicit pattern are gathered from the staging.
template <class T>
void check_groups_bitwise(const sparse_pattern& pat, index_t nq, index_t nk, layout lay, bool causal) {
  INFO("nq=" << nq << " nk=" << nk << " layout=" << int(lay) << " causal=" << causal
              << " dtype=" << element_name<T>());
  tensor4<T> q(2, nq, 4, 24, lay), k(2, nk, 2, 24, lay), v(2, nk, 2, 20, lay);
  test::fill_uniform(q, 1);
  test::fill_uniform(k, 2);
  test::fill_uniform(v, 3);
  attention_params p;
  p.causal = causal;
  auto run = [&](index_t group, std::size_t stage_bytes, tensor4<float>& o, tensor3<float>& l) {
    o.reset(2, nq, 4, 20);
    l = tensor3<float>(2, 4, nq);
    detail::sparse_dispatch(q.cview(), k.cview(), v.cview(), o.view, pat, p, l.view, group, stage_bytes);
  };
  tensor4<float> o1, o2;
  tensor3<float> l1(2, 4, nq), l2(2, 4, nq);
  run(1, 0, o1, l1);
  // A limit that stages a sliding window's groups (up to 4 * 48 + 170 keys of 24 + 20 elements)
  // but not those with a global row (every key).
  const std::size_t small = std::size_t(400 * 44) * sizeof(accum_t<T>);
  for (auto [group, stage_bytes] : {std::pair<index_t, std::size_t>{4, detail::max_stage_bytes},
                                    {4, small},
                                    {3, small},
                                    {2, detail::max_stage_bytes}}) {
    INFO("group=" << group << " stage_bytes=" << stage_bytes);
    run(group, stage_bytes, o2, l2);
    CHECK(std::memcmp(o1.buf.data(), o2.buf.data(), o1.buf.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(l1.buf.data(), l2.buf.data(), l1.buf.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("sparse: staged groups of blocks give the bits of blocks run one by one") {
  sparse_pattern window;  // consecutive groups share most keys
  window.window_left = 150;
  window.window_right = 20;
  sparse_pattern bigbird = window;  // global rows (unstaged groups), random blocks, 32-row blocks
  bigbird.window_left = bigbird.window_right = 40;
  bigbird.global_tokens = {0, 1, 333, 640};
  bigbird.block_size = 64;
  bigbird.random_blocks = 2;
  bigbird.seed = 3;
  sparse_pattern dilated;  // runs shorter than a tile: gathered from the staging
  dilated.window_left = 30;
  dilated.window_right = 6;
  dilated.dilation = 5;
  const csr_pattern extra = random_csr(700, 650, 0.03, 11);
  sparse_pattern explicit_pat;  // diagonal + random keys
  explicit_pat.extra = &extra;
  for (const auto* pat : {&window, &bigbird, &dilated, &explicit_pat})
    for (bool causal : {false, true}) {
      check_groups_bitwise<float>(*pat, 700, 650, layout::bshd, causal);
      check_groups_bitwise<bf16>(*pat, 700, 650, layout::strided, causal);
    }
  check_groups_bitwise<double>(window, 700, 650, layout::bhsd, true);
}

TEST_CASE("sparse_attention and to_csr validate patterns and write nothing on failure") {
  tensor4<float> q(1, 4, 2, 8), k(1, 6, 2, 8), v(1, 6, 2, 8), out(1, 4, 2, 8);
  test::fill_uniform(q, 1);
  test::fill_uniform(k, 2);
  test::fill_uniform(v, 3);
  const float sentinel = 777.f;
  std::fill(out.buf.begin(), out.buf.end(), sentinel);
  tensor3<float> lse(1, 2, 4, sentinel);
  auto run = [&](const auto& pat) { sparse_attention(q.view, k.view, v.view, out.view, pat, {}, lse.view); };
  const std::string fn = "sparse_attention";

  sparse_pattern p;
  p.window_left = -1;
  test::require_error([&] { run(p); }, {fn, "pattern.window_left", ">= 0", "-1"});
  test::require_error([&] { to_csr(p, 4, 6, 0); }, {"to_csr", "pattern.window_left"});
  p = {};
  p.window_right = -2;
  test::require_error([&] { run(p); }, {fn, "pattern.window_right"});
  p = {};
  p.dilation = 0;
  test::require_error([&] { run(p); }, {fn, "pattern.dilation", ">= 1"});
  p = {};
  p.global_tokens = {1, 6};
  test::require_error([&] { run(p); }, {fn, "pattern.global_tokens[1]", "[0, 6)", "6"});
  test::require_error([&] { to_csr(p, 4, 6, 0); }, {"to_csr", "pattern.global_tokens[1]"});
  p.global_tokens = {-1};
  test::require_error([&] { run(p); }, {fn, "pattern.global_tokens[0]"});
  p = {};
  p.block_size = 0;
  test::require_error([&] { run(p); }, {fn, "pattern.block_size"});
  p = {};
  p.random_blocks = -1;
  test::require_error([&] { run(p); }, {fn, "pattern.random_blocks"});
  test::require_error([&] { to_csr(sparse_pattern{}, 4, 6, -1); }, {"to_csr", "head"});

  csr_pattern c;
  c.row_ptr = {0, 1, 2, 3};  // Nq + 1 = 5 expected
  c.col_idx = {0, 1, 2};
  test::require_error([&] { run(c); }, {fn, "pattern.row_ptr", "size Nq + 1 = 5", "4"});
  c.row_ptr = {0, 1, 2, 3, 4};
  c.col_idx = {0, 1, 2, 6};  // out of range
  test::require_error([&] { run(c); }, {fn, "pattern.col_idx[3]", "[0, 6)", "6"});
  c.col_idx = {0, 1, 2, -1};
  test::require_error([&] { run(c); }, {fn, "pattern.col_idx[3]"});
  c.row_ptr = {0, 2, 2, 3, 4};
  c.col_idx = {3, 1, 2, 4};  // unsorted in row 0
  test::require_error([&] { run(c); }, {fn, "pattern.col_idx[1]", "sorted, unique"});
  c.col_idx = {1, 1, 2, 4};  // duplicate in row 0
  test::require_error([&] { run(c); }, {fn, "pattern.col_idx[1]", "sorted, unique"});
  c.row_ptr = {0, 2, 1, 3, 4};  // decreasing
  c.col_idx = {1, 2, 2, 4};
  test::require_error([&] { run(c); }, {fn, "pattern.row_ptr[2]"});
  c.row_ptr = {0, 1, 2, 3, 5};  // last entry != col_idx.size()
  test::require_error([&] { run(c); }, {fn, "pattern.row_ptr[4]", "col_idx.size() = 4"});
  c.row_ptr = {1, 1, 2, 3, 4};
  test::require_error([&] { run(c); }, {fn, "pattern.row_ptr[0]"});
  p = {};
  c.row_ptr = {0, 1, 2, 3, 4};
  c.col_idx = {0, 1, 9, 2};
  p.extra = &c;
  test::require_error([&] { run(p); }, {fn, "pattern.extra->col_idx[2]"});
  test::require_error([&] { to_csr(p, 4, 6, 0); }, {"to_csr", "pattern.extra->col_idx[2]"});
  test::require_error([&] { to_csr(p, 5, 6, 0); }, {"to_csr", "pattern.extra->row_ptr", "size Nq + 1 = 6"});
  // Shape errors are reported as by flash_attention.
  tensor4<float> k_bad(1, 6, 3, 8);
  test::require_error([&] { sparse_attention(q.view, k_bad.view, v.view, out.view, sparse_pattern{}); }, {fn, "k", "dividing"});
  CHECK(test::untouched(out.buf, sentinel));
  CHECK(test::untouched(lse.buf, sentinel));
}
