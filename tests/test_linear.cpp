// linear_attention (chunked causal, non-causal, recurrent steps) against reference_linear_attention
// in double, FAVOR+ against softmax attention, the projection helper, and input validation.
//
// Tolerances and the shared helpers: tests/linear_cases.hpp.
#include "linear_cases.hpp"

#include <cstring>

using namespace attnkit;
using test::against_reference;
using test::fill_range;
using test::needs_positive;
using test::tensor4;

namespace {

constexpr double tol_float = test::linear_tol_float;
constexpr double tol_double = test::linear_tol_double;
const auto& all_maps = test::all_feature_maps;
using qkv = test::qkv<float>;
constexpr auto& make_params = test::make_linear_params;

}  // namespace

TEST_CASE("identity map by hand: causal (q k^T masked) v plain normalized and decayed") {
  tensor4<double> q(1, 3, 1, 1), k(1, 3, 1, 1), v(1, 3, 1, 1), out(1, 3, 1, 1), ref(1, 3, 1, 1);
  const double qs[] = {1, 2, 3}, ks[] = {1, 1, 2}, vs[] = {1, 2, 3};
  for (index_t i = 0; i < 3; ++i) {
    q(0, i, 0, 0) = qs[i];
    k(0, i, 0, 0) = ks[i];
    v(0, i, 0, 0) = vs[i];
  }
  linear_params p;
  p.phi = feature_map::identity;
  p.causal = true;
  p.normalize = false;
  linear_attention(q.view, k.view, v.view, out.view, p);
  reference_linear_attention(q.view, k.view, v.view, ref.view, p);
  // out_i = q_i * sum_{j <= i} k_j v_j: 1 * 1, 2 * (1 + 2), 3 * (1 + 2 + 6)
  const double want[] = {1, 6, 27};
  for (index_t i = 0; i < 3; ++i) {
    CHECK(out(0, i, 0, 0) == Approx(want[i]).epsilon(1e-15));
    CHECK(ref(0, i, 0, 0) == Approx(want[i]).epsilon(1e-15));
  }
  p.normalize = true;
  p.eps = 0.5f;
  linear_attention(q.view, k.view, v.view, out.view, p);
  CHECK(out(0, 2, 0, 0) == Approx(27.0 / (3.0 * 4.0 + 0.5)).epsilon(1e-15));
  const float half = 0.5f;
  p.decay = &half;
  p.normalize = false;
  linear_attention(q.view, k.view, v.view, out.view, p);
  CHECK(out(0, 2, 0, 0) == Approx(3.0 * (0.25 * 1 + 0.5 * 2 + 6)).epsilon(1e-15));
  // Non-causal: every query sees every key.
  p = {};
  p.phi = feature_map::identity;
  p.normalize = false;
  linear_attention(q.view, k.view, v.view, out.view, p);
  CHECK(out(0, 0, 0, 0) == Approx(1.0 * 9).epsilon(1e-15));
}

TEST_CASE("every feature map x causal x normalize x decay matches the reference") {
  // 150 positions: several full chunks (of 32) and a partial one; GQA 4 query heads on 2 kv heads; batch 2.
  const index_t B = 2, N = 150, Hq = 4, Hkv = 2;
  const float decay[Hq] = {1.f, 0.99f, 0.9f, 0.5f};
  for (index_t D : {1, 31, 80}) {
    const index_t Dv = D == 31 ? 33 : D;
    const favor_projection proj = make_favor_projection(D == 31 ? 48 : 2 * D, D, 7);
    for (feature_map phi : all_maps)
      for (bool causal : {false, true})
        for (bool normalize : {true, false})
          for (bool decayed : {false, true}) {
            if (decayed && !causal) continue;
            const qkv in(B, N, N, Hq, Hkv, D, Dv, 100 + std::uint64_t(D), needs_positive(phi, normalize));
            const linear_params p = make_params(phi, causal, normalize, decayed ? decay : nullptr, &proj);
            const auto e = against_reference(in.q.view, in.k.view, in.v.view, p);
            INFO(feature_map_name(phi) << " D=" << D << " causal=" << causal << " normalize=" << normalize
                                       << " decay=" << decayed << " rel=" << e.rel());
            CHECK_FALSE(e.mismatched_nonfinite);
            CHECK(e.rel() < tol_float);
          }
  }
}

TEST_CASE("causal chunks: value widths of 1 to 8 vectors, Dv != D, and lengths around the chunk boundaries") {
  // The register kernels split a row of Dv values into blocks of 3, 2 and 1 vectors (4 vectors as
  // 2 + 2) for both vector widths (8 and 16 floats); the chunk is 32 positions.
  const float decay[2] = {0.97f, 1.f};
  for (index_t D : {64, 20})
    for (index_t Dv : {8, 16, 32, 48, 64, 65, 96, 112, 128})
      for (index_t N : {31, 32, 33, 97})
        for (bool decayed : {false, true}) {
          const qkv in(1, N, N, 2, 1, D, Dv, 500 + std::uint64_t(D + Dv + N));
          linear_params p;
          p.causal = true;
          p.decay = decayed ? decay : nullptr;
          p.normalize = !decayed;
          const auto e = against_reference(in.q.view, in.k.view, in.v.view, p);
          INFO("D=" << D << " Dv=" << Dv << " N=" << N << " decay=" << decayed << " rel=" << e.rel());
          CHECK(e.rel() < tol_float);
        }
}

TEST_CASE("non-causal with Nq != Nk and batch 3 and GQA 6:2 and Dv != D") {
  const index_t B = 3, Nq = 37, Nk = 201, Hq = 6, Hkv = 2, D = 24, Dv = 40;
  const favor_projection proj = make_favor_projection(64, D, 11), proj16 = make_favor_projection(32, 16, 12);
  for (feature_map phi : all_maps) {
    const qkv in(B, Nq, Nk, Hq, Hkv, D, Dv, 200, needs_positive(phi, true));
    const auto e = against_reference(in.q.view, in.k.view, in.v.view, make_params(phi, false, true, nullptr, &proj));
    INFO(feature_map_name(phi) << " rel=" << e.rel());
    CHECK(e.rel() < tol_float);
  }
  // Nq = 1 (a single query) and Nk < chunk.
  const qkv in(1, 1, 5, 2, 1, 8, 8, 201);
  CHECK(against_reference(in.q.view, in.k.view, in.v.view, linear_params{}).rel() < tol_float);
  // MQA with query rows over three output tasks (1024, 1024 and 52 rows) of one kv head's state.
  for (feature_map phi : {feature_map::elu_plus_one, feature_map::favor_positive}) {
    const qkv mqa(1, 2100, 130, 3, 1, 16, 8, 202);
    const linear_params p = make_params(phi, false, true, nullptr, &proj16);
    const auto e = against_reference(mqa.q.view, mqa.k.view, mqa.v.view, p);
    INFO(feature_map_name(phi) << " rel=" << e.rel());
    CHECK(e.rel() < tol_float);
  }
}

TEST_CASE("memory layout does not change a single bit of the output") {
  const index_t B = 2, N = 70, Hq = 2, Hkv = 1, D = 20, Dv = 12;
  const favor_projection proj = make_favor_projection(32, D, 3);
  const float decay[2] = {0.95f, 1.f};
  for (feature_map phi : {feature_map::elu_plus_one, feature_map::favor_positive})
    for (bool causal : {false, true}) {
      const linear_params p = make_params(phi, causal, true, causal ? decay : nullptr, &proj);
      const qkv base(B, N, N, Hq, Hkv, D, Dv, 300);
      tensor4<float> out(B, N, Hq, Dv);
      linear_attention(base.q.view, base.k.view, base.v.view, out.view, p);
      for (auto l : {test::layout::bhsd, test::layout::padded, test::layout::strided}) {
        const qkv in(B, N, N, Hq, Hkv, D, Dv, 300, false, l);
        tensor4<float> out2(B, N, Hq, Dv, l);
        linear_attention(in.q.view, in.k.view, in.v.view, out2.view, p);
        INFO(test::layout_name(l) << " " << feature_map_name(phi) << " causal=" << causal);
        CHECK(test::compare(out2.view, out.view).max_abs == 0);
      }
    }
}

TEST_CASE("causal GQA: query heads sharing a kv head's state give bitwise the output of separate kv heads") {
  // The causal form computes one state for the query heads of a kv head with equal decay and equal
  // initial state. Duplicating each kv head for its query heads (no sharing possible) must give the
  // same bits: for whole groups per task (1 thread, or B 4) and groups split over tasks (B 1 on 4
  // threads: 2 + 2 heads for groups of 4; 3-head tasks that straddle the groups of 5), for decays
  // equal or not within a group, and for a prefill in two pieces through a state.
  const index_t N = 75, N1 = 40, Hkv = 2, D = 20, Dv = 12;
  const favor_projection proj = make_favor_projection(24, D, 9);
  for (index_t G : {index_t(4), index_t(5)})
    for (index_t B : {index_t(1), index_t(4)})
      for (feature_map phi : {feature_map::elu_plus_one, feature_map::favor_positive})
        for (int mode : {0, 1, 2}) {  // no decay, equal within each group, mixed
          const index_t Hq = G * Hkv;
          std::vector<float> decay_values(static_cast<std::size_t>(Hq));
          for (index_t h = 0; h < Hq; ++h)
            decay_values[static_cast<std::size_t>(h)] =
                mode == 1 ? 0.9f - 0.1f * float(h / G) : h % 3 == 2 ? 0.95f : 0.9f;
          const float* decay = mode == 0 ? nullptr : decay_values.data();
          const linear_params p = make_params(phi, true, true, decay, &proj);
          const qkv in(B, N, N, Hq, Hkv, D, Dv, 700);
          tensor4<float> k(B, N, Hq, D), v(B, N, Hq, Dv);
          for (index_t b = 0; b < B; ++b)
            for (index_t t = 0; t < N; ++t)
              for (index_t h = 0; h < Hq; ++h) {
                for (index_t d = 0; d < D; ++d) k(b, t, h, d) = in.k.view(b, t, h / G, d);
                for (index_t d = 0; d < Dv; ++d) v(b, t, h, d) = in.v.view(b, t, h / G, d);
              }
          INFO("G=" << G << " B=" << B << " " << feature_map_name(phi) << " decay mode " << mode);
          tensor4<float> shared(B, N, Hq, Dv), separate(B, N, Hq, Dv);
          linear_attention(in.q.view, k.view, v.view, separate.view, p);
#if defined(_OPENMP)
          const int saved = omp_get_max_threads();
          for (int threads : {1, 4}) {
            omp_set_num_threads(threads);
            linear_attention(in.q.view, in.k.view, in.v.view, shared.view, p);
            CHECK(std::memcmp(shared.buf.data(), separate.buf.data(), shared.buf.size() * sizeof(float)) == 0);
          }
          omp_set_num_threads(saved);
#else
          linear_attention(in.q.view, in.k.view, in.v.view, shared.view, p);
          CHECK(std::memcmp(shared.buf.data(), separate.buf.data(), shared.buf.size() * sizeof(float)) == 0);
#endif
          // In two pieces through a state: the second piece starts from states that are equal within a
          // group (uniform or no decay) or not (mixed decay; and head 1, whose state is halved between
          // the pieces), and the final states agree too.
          const index_t F = linear_feature_dim(p, D);
          linear_attention_state st_shared(B, Hq, F, Dv), st_separate = st_shared;
          for (auto [t0, t1] : {std::pair<index_t, index_t>{0, N1}, {N1, N}}) {
            linear_attention(in.q.view.slice(1, t0, t1), in.k.view.slice(1, t0, t1), in.v.view.slice(1, t0, t1),
                             shared.view.slice(1, t0, t1), p, st_shared);
            linear_attention(in.q.view.slice(1, t0, t1), k.view.slice(1, t0, t1), v.view.slice(1, t0, t1),
                             separate.view.slice(1, t0, t1), p, st_separate);
            for (auto* st : {&st_shared, &st_separate}) {
              for (index_t e = F * Dv; e < 2 * F * Dv; ++e) st->s[static_cast<std::size_t>(e)] *= 0.5f;
              for (index_t e = F; e < 2 * F; ++e) st->z[static_cast<std::size_t>(e)] *= 0.5f;
            }
          }
          CHECK(std::memcmp(shared.buf.data(), separate.buf.data(), shared.buf.size() * sizeof(float)) == 0);
          CHECK(st_shared.s == st_separate.s);
          CHECK(st_shared.z == st_separate.z);
        }
}

TEST_CASE("a state per kv head gives bitwise the outputs and states of a state per query head") {
  // Prefill in two pieces, then decode steps, once with a state per query head and once with a state
  // per kv head (which all query heads of a group share): the same bits everywhere, for groups whose
  // heads stay in one task (1 thread, or B 3) and groups split over tasks (B 1 on 4 threads: the
  // split reads a copy of the initial states), groups of 4 and 6 (a step serves 4 heads per pass over
  // the state, then reads it again for the rest), and value widths around the vector width.
  const index_t N = 80, N1 = 33, N2 = 70, Hkv = 2, D = 13;
  const std::pair<index_t, index_t> pieces[] = {{0, N1}, {N1, N2}};  // prefill, then steps from N2
  const favor_projection proj = make_favor_projection(20, D, 5);
  for (index_t G : {index_t(4), index_t(6)})
    for (index_t B : {index_t(1), index_t(3)})
      for (index_t Dv : {index_t(7), index_t(40)})
        for (feature_map phi : {feature_map::elu_plus_one, feature_map::favor_positive, feature_map::identity})
          for (bool decayed : {false, true}) {
            const index_t Hq = G * Hkv;
            std::vector<float> decay(static_cast<std::size_t>(Hq));
            for (index_t h = 0; h < Hq; ++h) decay[static_cast<std::size_t>(h)] = 0.97f - 0.05f * float(h / G);
            const bool normalize = phi != feature_map::identity;
            const linear_params p = make_params(phi, true, normalize, decayed ? decay.data() : nullptr, &proj);
            const qkv in(B, N, N, Hq, Hkv, D, Dv, 900, needs_positive(phi, normalize));
            const index_t F = linear_feature_dim(p, D);
            INFO("G=" << G << " B=" << B << " Dv=" << Dv << " " << feature_map_name(phi) << " decay=" << decayed);
            const auto run = [&](index_t state_heads, tensor4<float>& out) {
              linear_attention_state st(B, state_heads, F, Dv);
              for (auto [t0, t1] : pieces)
                linear_attention(in.q.view.slice(1, t0, t1), in.k.view.slice(1, t0, t1), in.v.view.slice(1, t0, t1),
                                 out.view.slice(1, t0, t1), p, st);
              for (index_t t = N2; t < N; ++t)
                linear_attention_step(st, in.q.view.slice(1, t, t + 1), in.k.view.slice(1, t, t + 1),
                                      in.v.view.slice(1, t, t + 1), out.view.slice(1, t, t + 1), p);
              CHECK(st.position == N);
              return st;
            };
            tensor4<float> per_query(B, N, Hq, Dv), per_kv(B, N, Hq, Dv);
            const linear_attention_state sq = run(Hq, per_query);
            const auto check = [&](const linear_attention_state<float>& sk) {
              CHECK(std::memcmp(per_kv.buf.data(), per_query.buf.data(), per_kv.buf.size() * sizeof(float)) == 0);
              // Every query head's state equals its kv head's.
              bool same = true;
              for (index_t b = 0; b < B; ++b)
                for (index_t h = 0; h < Hq; ++h) {
                  const index_t i = b * Hq + h, j = b * Hkv + h / G;
                  same = same && std::memcmp(sq.s.data() + i * F * Dv, sk.s.data() + j * F * Dv,
                                             sizeof(float) * F * Dv) == 0;
                  same = same && std::memcmp(sq.z.data() + i * F, sk.z.data() + j * F, sizeof(float) * F) == 0;
                  same = same && std::memcmp(&sq.key_max[static_cast<std::size_t>(i)],
                                             &sk.key_max[static_cast<std::size_t>(j)], sizeof(float)) == 0;
                }
              CHECK(same);
            };
#if defined(_OPENMP)
            const int saved = omp_get_max_threads();
            for (int threads : {1, 4}) {
              omp_set_num_threads(threads);
              std::fill(per_kv.buf.begin(), per_kv.buf.end(), -1.f);
              check(run(Hkv, per_kv));
            }
            omp_set_num_threads(saved);
#else
            check(run(Hkv, per_kv));
#endif
            // And both agree with the definition.
            tensor4<float> ref(B, N, Hq, Dv);
            reference_linear_attention(in.q.view, in.k.view, in.v.view, ref.view, p);
            CHECK(test::compare(per_kv.view, ref.view).rel() < tol_float);
          }
}

TEST_CASE("bf16 and f16 inputs match the reference on the same rounded values and double matches to 1e-12") {
  const index_t B = 1, N = 90, Hq = 2, Hkv = 2, D = 33, Dv = 16;
  const favor_projection proj = make_favor_projection(40, D, 5);
  const float decay[2] = {0.97f, 0.8f};
  for (feature_map phi : {feature_map::elu_plus_one, feature_map::relu, feature_map::favor_positive})
    for (bool causal : {false, true}) {
      const linear_params p = make_params(phi, causal, true, causal ? decay : nullptr, &proj);
      INFO(feature_map_name(phi) << " causal=" << causal);
      {
        tensor4<bf16> q(B, N, Hq, D), k(B, N, Hkv, D), v(B, N, Hkv, Dv);
        test::fill_uniform(q, 1);
        test::fill_uniform(k, 2);
        test::fill_uniform(v, 3);
        CHECK(against_reference(q.view, k.view, v.view, p).rel() < tol_float);
      }
      {
        tensor4<f16> q(B, N, Hq, D, test::layout::strided), k(B, N, Hkv, D), v(B, N, Hkv, Dv);
        test::fill_uniform(q, 4);
        test::fill_uniform(k, 5);
        test::fill_uniform(v, 6);
        CHECK(against_reference(q.view, k.view, v.view, p).rel() < tol_float);
      }
      {
        tensor4<double> q(B, N, Hq, D), k(B, N, Hkv, D), v(B, N, Hkv, Dv), out(B, N, Hq, Dv), ref(B, N, Hq, Dv);
        test::fill_uniform(q, 7);
        test::fill_uniform(k, 8);
        test::fill_uniform(v, 9);
        linear_attention(q.view, k.view, v.view, out.view, p);
        reference_linear_attention(q.view, k.view, v.view, ref.view, p);
        CHECK(test::compare(out.view, ref.view).rel() < tol_double);
      }
    }
}

TEST_CASE("recurrent steps equal the causal parallel form and so do prefill + steps") {
  const index_t B = 2, N = 77, Hq = 4, Hkv = 2, D = 19, Dv = 21;
  const favor_projection proj = make_favor_projection(50, D, 13);
  const float decay[Hq] = {0.9f, 1.f, 0.99f, 0.7f};
  for (feature_map phi : all_maps)
    for (bool normalize : {true, false})
      for (bool decayed : {false, true}) {
        const linear_params p = make_params(phi, true, normalize, decayed ? decay : nullptr, &proj);
        const qkv in(B, N, N, Hq, Hkv, D, Dv, 400, needs_positive(phi, normalize));
        tensor4<float> par(B, N, Hq, Dv), rec(B, N, Hq, Dv), mixed(B, N, Hq, Dv);
        linear_attention(in.q.view, in.k.view, in.v.view, par.view, p);

        linear_attention_state st(B, Hq, linear_feature_dim(p, D), Dv);
        for (index_t t = 0; t < N; ++t)
          linear_attention_step(st, in.q.view.slice(1, t, t + 1), in.k.view.slice(1, t, t + 1),
                                in.v.view.slice(1, t, t + 1), rec.view.slice(1, t, t + 1), p);
        CHECK(st.position == N);

        // Prefill 70 positions in two uneven pieces (crossing a chunk boundary), then 7 steps.
        linear_attention_state st2(B, Hq, linear_feature_dim(p, D), Dv);
        auto piece = [&](index_t a, index_t e) {
          linear_attention(in.q.view.slice(1, a, e), in.k.view.slice(1, a, e), in.v.view.slice(1, a, e),
                           mixed.view.slice(1, a, e), p, st2);
        };
        piece(0, 45);
        piece(45, 70);
        for (index_t t = 70; t < N; ++t)
          linear_attention_step(st2, in.q.view.slice(1, t, t + 1), in.k.view.slice(1, t, t + 1),
                                in.v.view.slice(1, t, t + 1), mixed.view.slice(1, t, t + 1), p);

        const auto e1 = test::compare(rec.view, par.view), e2 = test::compare(mixed.view, par.view);
        INFO(feature_map_name(phi) << " normalize=" << normalize << " decay=" << decayed << " rel steps=" << e1.rel()
                                   << " rel prefill=" << e2.rel());
        CHECK(e1.rel() < tol_float);
        CHECK(e2.rel() < tol_float);
        CHECK_FALSE(e1.mismatched_nonfinite);
      }
}

TEST_CASE("a double state accumulates double inputs in double: steps equal the parallel form to 1e-12") {
  const index_t B = 1, N = 70, Hq = 2, Hkv = 1, D = 9, Dv = 5;
  const favor_projection proj = make_favor_projection(12, D, 3);
  const float decay[Hq] = {0.95f, 1.f};
  for (feature_map phi : {feature_map::elu_plus_one, feature_map::favor_positive}) {
    const linear_params p = make_params(phi, true, true, decay, &proj);
    tensor4<double> q(B, N, Hq, D), k(B, N, Hkv, D), v(B, N, Hkv, Dv), par(B, N, Hq, Dv), rec(B, N, Hq, Dv),
        ref(B, N, Hq, Dv);
    test::fill_uniform(q, 31);
    test::fill_uniform(k, 32);
    test::fill_uniform(v, 33);
    linear_attention(q.view, k.view, v.view, par.view, p);
    reference_linear_attention(q.view, k.view, v.view, ref.view, p);
    linear_attention_state<double> st(B, Hq, linear_feature_dim(p, D), Dv);
    for (index_t t = 0; t < N; ++t)
      linear_attention_step(st, q.view.slice(1, t, t + 1), k.view.slice(1, t, t + 1), v.view.slice(1, t, t + 1),
                            rec.view.slice(1, t, t + 1), p);
    INFO(feature_map_name(phi));
    CHECK(test::compare(par.view, ref.view).rel() < tol_double);
    CHECK(test::compare(rec.view, ref.view).rel() < tol_double);
  }
}

TEST_CASE("outputs are bitwise identical for 1, 2 and 3 threads") {
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  const index_t B = 2, N = 300, Hq = 4, Hkv = 2, D = 32, Dv = 32;
  const favor_projection proj = make_favor_projection(64, D, 17);
  const float decay[Hq] = {0.9f, 1.f, 0.99f, 0.7f};
  const qkv in(B, N, N, Hq, Hkv, D, Dv, 500);
  // mode 0: non-causal; 1: causal with decay; 2: causal without decay (the two query heads of a kv
  // head share one state).
  for (feature_map phi : {feature_map::elu_plus_one, feature_map::favor_positive})
    for (int mode : {0, 1, 2}) {
      const bool causal = mode > 0;
      const linear_params p = make_params(phi, causal, true, mode == 1 ? decay : nullptr, &proj);
      tensor4<float> o1(B, N, Hq, Dv), o2(B, N, Hq, Dv), s1(B, 1, Hq, Dv), s2(B, 1, Hq, Dv);
      linear_attention_state st1(B, Hq, linear_feature_dim(p, D), Dv), st2 = st1;
      omp_set_num_threads(1);
      linear_attention(in.q.view, in.k.view, in.v.view, o1.view, p);
      if (causal)
        linear_attention_step(st1, in.q.view.slice(1, 0, 1), in.k.view.slice(1, 0, 1), in.v.view.slice(1, 0, 1),
                              s1.view, p);
      omp_set_num_threads(2);
      linear_attention(in.q.view, in.k.view, in.v.view, o2.view, p);
      if (causal)
        linear_attention_step(st2, in.q.view.slice(1, 0, 1), in.k.view.slice(1, 0, 1), in.v.view.slice(1, 0, 1),
                              s2.view, p);
      INFO(feature_map_name(phi) << " mode=" << mode);
      CHECK(std::memcmp(o1.buf.data(), o2.buf.data(), o1.buf.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(s1.buf.data(), s2.buf.data(), s1.buf.size() * sizeof(float)) == 0);
      CHECK(st1.s == st2.s);
    }
  // Decode steps big enough to be split into chunks (their number depends on the thread count):
  // 16 sequences x 8 query heads over 2 kv heads, a state per query head and per kv head.
  {
    const index_t Bs = 16, Hqs = 8, Hkvs = 2, Ds = 64;
    const qkv big(Bs, 3, 3, Hqs, Hkvs, Ds, Ds, 501);
    linear_params p;
    p.causal = true;
    for (index_t heads : {Hqs, Hkvs}) {
      std::vector<float> outs[2];
      std::vector<float> states[2];
      for (int run = 0; run < 2; ++run) {
        omp_set_num_threads(run == 0 ? 1 : 3);  // 4 and 6 chunks
        linear_attention_state st(Bs, heads, Ds, Ds);
        tensor4<float> o(Bs, 3, Hqs, Ds);
        for (index_t t = 0; t < 3; ++t)
          linear_attention_step(st, big.q.view.slice(1, t, t + 1), big.k.view.slice(1, t, t + 1),
                                big.v.view.slice(1, t, t + 1), o.view.slice(1, t, t + 1), p);
        outs[run] = o.buf;
        states[run] = st.s;
      }
      INFO("state heads " << heads);
      CHECK(std::memcmp(outs[0].data(), outs[1].data(), outs[0].size() * sizeof(float)) == 0);
      CHECK(states[0] == states[1]);
    }
  }
  omp_set_num_threads(saved);
#else
  SUCCEED("built without OpenMP: a single thread");
#endif
}

TEST_CASE("FAVOR+ with m = 256 and d = 64 approximates softmax attention and the error shrinks as m grows") {
  // Clustered inputs: q and k are noisy copies of 8 random directions, scaled so |x'|^2 = scale |x|^2
  // = 1 (the regime FAVOR+ targets; its variance grows like exp(|q' + k'|^2)). Logits then range over
  // about [-0.3, 1], so softmax favours each query's cluster and the output differs clearly from the
  // uniform average of v (the "trivial" predictor below).
  // Measure: relative RMS error ||favor - softmax||_2 / ||softmax||_2 over the whole output (non-causal,
  // N = 128, 2 heads), averaged over 4 projection seeds. Asserted for m = 256: below 0.2 (measured 0.125) and below
  // 0.6 x the trivial predictor's error; and it falls as m grows (like 1/sqrt(m)).
  const index_t B = 1, N = 128, H = 2, D = 64, clusters = 8;
  std::mt19937_64 g(600);
  std::normal_distribution<double> normal;
  std::vector<double> centre(static_cast<std::size_t>(clusters * D));
  for (auto& x : centre) x = normal(g);
  auto clustered = [&](tensor4<float>& t) {
    std::vector<double> x(static_cast<std::size_t>(D));
    for (index_t i = 0; i < N; ++i)
      for (index_t h = 0; h < H; ++h) {
        const index_t c = (i * 7 + h * 3) % clusters;
        double sq = 0;
        for (index_t d = 0; d < D; ++d) {
          x[std::size_t(d)] = centre[std::size_t(c * D + d)] + 0.5 * normal(g);
          sq += x[std::size_t(d)] * x[std::size_t(d)];
        }
        const double s = std::sqrt(std::sqrt(double(D)) / sq);  // |x|^2 = sqrt(d), so |x'|^2 = 1
        for (index_t d = 0; d < D; ++d) t(0, i, h, d) = float(x[std::size_t(d)] * s);
      }
  };
  tensor4<float> q(B, N, H, D), k(B, N, H, D), v(B, N, H, D);
  clustered(q);
  clustered(k);
  fill_range(v, 602, -1.f, 1.f);
  tensor4<double> soft(B, N, H, D);
  reference_attention(q.view, k.view, v.view, soft.view);
  double sq_soft = 0, sq_trivial = 0;
  for (index_t h = 0; h < H; ++h)
    for (index_t d = 0; d < D; ++d) {
      double mean = 0;
      for (index_t j = 0; j < N; ++j) mean += v(0, j, h, d) / double(N);
      for (index_t i = 0; i < N; ++i) {
        sq_soft += soft(0, i, h, d) * soft(0, i, h, d);
        sq_trivial += (soft(0, i, h, d) - mean) * (soft(0, i, h, d) - mean);
      }
    }
  const double trivial = std::sqrt(sq_trivial / sq_soft);
  auto rel_rms = [&](index_t m) {
    double sum = 0;
    for (std::uint64_t seed = 1; seed <= 4; ++seed) {
      const favor_projection proj = make_favor_projection(m, D, seed);
      linear_params p;
      p.phi = feature_map::favor_positive;
      p.projection = proj;
      tensor4<float> out(B, N, H, D);
      linear_attention(q.view, k.view, v.view, out.view, p);
      double num = 0;
      for (index_t i = 0; i < N; ++i)
        for (index_t h = 0; h < H; ++h)
          for (index_t d = 0; d < D; ++d) {
            const double diff = out(0, i, h, d) - soft(0, i, h, d);
            num += diff * diff;
          }
      sum += std::sqrt(num / sq_soft) / 4;
    }
    return sum;
  };
  const double e16 = rel_rms(16), e64 = rel_rms(64), e256 = rel_rms(256), e1024 = rel_rms(1024);
  INFO("relative RMS error: trivial " << trivial << "; m=16 " << e16 << ", 64 " << e64 << ", 256 " << e256
                                      << ", 1024 " << e1024);
  CHECK(e256 < 0.2);
  CHECK(e256 < 0.6 * trivial);
  CHECK(e64 < e16);
  CHECK(e256 < e64);
  CHECK(e1024 < e256);
  CHECK(e1024 < 0.7 * e64);  // 16x the features: about a quarter of the error, with room for chance
}

TEST_CASE("make_favor_projection: orthogonal blocks with chi norms and deterministic per seed") {
  const index_t m = 100, d = 32;  // blocks of 32, 32, 32 and 4 rows
  const favor_projection a = make_favor_projection(m, d, 9), b = make_favor_projection(m, d, 9),
                         c = make_favor_projection(m, d, 10);
  CHECK(a.values == b.values);
  CHECK(a.values != c.values);
  const auto P = a.view();
  CHECK(P.extent(0) == m);
  CHECK(P.extent(1) == d);
  auto dotp = [&](index_t r, index_t s) {
    double x = 0;
    for (index_t j = 0; j < d; ++j) x += double(P(r, j)) * P(s, j);
    return x;
  };
  double worst = 0, mean_norm = 0;
  for (index_t r = 0; r < m; ++r) {
    mean_norm += std::sqrt(dotp(r, r)) / double(m);
    for (index_t s = r + 1; s < m && s / d == r / d; ++s)
      worst = std::max(worst, std::abs(dotp(r, s)) / std::sqrt(dotp(r, r) * dotp(s, s)));
  }
  CHECK(worst < 1e-6);
  CHECK(mean_norm == Approx(std::sqrt(double(d))).epsilon(0.1));  // E chi_d ~ sqrt(d - 1/2)
  // Rows of different blocks are not orthogonal in general.
  CHECK(std::abs(dotp(0, d)) > 1e-3);
  const favor_projection g = make_favor_projection(m, d, 9, false);
  double gn = 0;
  for (float x : g.values) gn += double(x) * x;
  CHECK(gn / double(m * d) == Approx(1.0).epsilon(0.1));
  test::require_error([] { (void)make_favor_projection(0, 4, 1); }, {"make_favor_projection", "m", "got 0"});
  test::require_error([] { (void)make_favor_projection(4, -1, 1); }, {"make_favor_projection", "d", "got -1"});
}

TEST_CASE("long decayed sequences stay finite and exact and FAVOR+ is stable for large logits") {
  {
    // gamma^(-i) would overflow float after ~1000 positions at gamma = 0.9.
    const index_t N = 3000, D = 4;
    const qkv in(1, N, N, 2, 1, D, D, 700);
    const float decay[2] = {0.9f, 0.999f};
    const auto e = against_reference(in.q.view, in.k.view, in.v.view,
                                     make_params(feature_map::elu_plus_one, true, true, decay, nullptr));
    CHECK_FALSE(e.mismatched_nonfinite);
    CHECK(e.rel() < tol_float);
    const auto e2 = against_reference(in.q.view, in.k.view, in.v.view,
                                      make_params(feature_map::relu, true, false, decay, nullptr));
    CHECK(e2.rel() < tol_float);
  }
  {
    // |x'| ~ 12: exp(W x') alone would overflow float (e^100 and more), the stabilized form does not.
    const index_t N = 100, D = 16;
    const favor_projection proj = make_favor_projection(32, D, 21);
    tensor4<float> q(1, N, 1, D), k(1, N, 1, D), v(1, N, 1, D);
    fill_range(q, 800, -6.f, 6.f);
    fill_range(k, 801, -6.f, 6.f);
    fill_range(v, 802, -1.f, 1.f);
    for (bool causal : {false, true}) {
      linear_params p = make_params(feature_map::favor_positive, causal, true, nullptr, &proj);
      p.scale = 1.f;
      const auto e = against_reference(q.view, k.view, v.view, p);
      INFO("causal=" << causal << " rel=" << e.rel());
      CHECK_FALSE(e.mismatched_nonfinite);
      CHECK(e.rel() < 1e-4);  // exponents of ~100 carry float rounding of ~1e-5 relative
    }
  }
}

TEST_CASE("empty sequences and zero denominators and NaN containment") {
  linear_params p;
  {
    tensor4<float> q(1, 3, 1, 4), k(1, 0, 1, 4), v(1, 0, 1, 4), out(1, 3, 1, 4);
    test::fill_uniform(q, 1);
    for (bool normalize : {true, false}) {
      p.normalize = normalize;
      test::fill_value(out, 5.f);
      linear_attention(q.view, k.view, v.view, out.view, p);
      CHECK(out(0, 2, 0, 3) == 0.f);
    }
    p.eps = 0.f;  // 0 / 0 -> 0 by definition
    p.normalize = true;
    linear_attention(q.view, k.view, v.view, out.view, p);
    CHECK(out(0, 0, 0, 0) == 0.f);
    const favor_projection proj = make_favor_projection(8, 4, 1);
    p = make_params(feature_map::favor_positive, false, true, nullptr, &proj);
    linear_attention(q.view, k.view, v.view, out.view, p);
    CHECK(out(0, 1, 0, 1) == 0.f);
  }
  {
    tensor4<float> q(2, 0, 2, 4), out(2, 0, 2, 4);
    p = {};
    p.causal = true;
    linear_attention(q.view, q.view, q.view, out.view, p);
    linear_attention_state st(2, 2, 4, 4);
    linear_attention(q.view, q.view, q.view, out.view, p, st);
    CHECK(st.position == 0);
  }
  {
    // relu with a query whose features are all 0 and eps = 0: denominator 0 -> output 0.
    tensor4<float> q(1, 2, 1, 3), k(1, 2, 1, 3), v(1, 2, 1, 3), out(1, 2, 1, 3);
    test::fill_value(q, -1.f);
    test::fill_value(k, 1.f);
    test::fill_value(v, 2.f);
    p = {};
    p.phi = feature_map::relu;
    p.eps = 0.f;
    linear_attention(q.view, k.view, v.view, out.view, p);
    CHECK(out(0, 1, 0, 2) == 0.f);
  }
  {
    // Causal: a NaN in v_j reaches rows >= j only (also inside j's chunk and row block); a NaN in
    // q_i reaches row i only.
    const index_t N = 100, D = 8;
    for (feature_map phi : {feature_map::elu_plus_one, feature_map::favor_positive}) {
      const favor_projection proj = make_favor_projection(16, D, 2);
      p = make_params(phi, true, true, nullptr, &proj);
      qkv in(1, N, N, 1, 1, D, D, 900);
      const float nan = std::numeric_limits<float>::quiet_NaN();
      in.v(0, 70, 0, 3) = nan;
      in.q(0, 20, 0, 1) = nan;
      tensor4<float> out(1, N, 1, D);
      linear_attention(in.q.view, in.k.view, in.v.view, out.view, p);
      INFO(feature_map_name(phi));
      for (index_t i = 0; i < N; ++i) {
        INFO("row " << i);
        CHECK(std::isnan(out(0, i, 0, 3)) == (i >= 70 || i == 20));
      }
      CHECK(std::isfinite(out(0, 71, 0, 2)));  // other value columns stay finite
    }
  }
}

// ---- validation: every check throws before anything is written -----------------------------------

TEST_CASE("linear_attention validates every argument and leaves out untouched") {
  const index_t B = 2, N = 5, Hq = 4, Hkv = 2, D = 6;
  const qkv in(B, N, N, Hq, Hkv, D, D, 1);
  tensor4<float> out(B, N, Hq, D);
  const float sentinel = -12345.f;
  std::fill(out.buf.begin(), out.buf.end(), sentinel);
  auto expect = [&](const linear_params& p, std::initializer_list<std::string> parts) {
    test::require_error([&] { linear_attention(in.q.view, in.k.view, in.v.view, out.view, p); }, parts);
    test::require_error([&] { reference_linear_attention(in.q.view, in.k.view, in.v.view, out.view, p); }, parts);
    CHECK(test::untouched(out.buf, sentinel));
  };
  // Shapes (shared with the softmax operators' checks).
  tensor4<float> k_bad(B, N, 3, D), v_bad(B, N + 1, Hkv, D), out_bad(B, N, Hq, D + 1), k_short(B, N - 1, Hkv, D),
      v_short(B, N - 1, Hkv, D);
  test::require_error([&] { linear_attention(in.q.view, k_bad.view, in.v.view, out.view, linear_params{}); },
                      {"linear_attention", "k", "dividing", "got 3"});
  test::require_error([&] { linear_attention(in.q.view, in.k.view, v_bad.view, out.view, linear_params{}); },
                      {"linear_attention", "v", "(2, 5, 2, 6)"});
  test::require_error([&] { linear_attention(in.q.view, in.k.view, in.v.view, out_bad.view, linear_params{}); },
                      {"linear_attention", "out", "(2, 5, 4, 6)"});
  linear_params p;
  p.causal = true;
  test::require_error([&] { linear_attention(in.q.view, k_short.view, v_short.view, out.view, p); },
                      {"linear_attention", "k", "sequence length 5", "got 4"});
  CHECK(test::untouched(out.buf, sentinel));

  p = {};
  p.phi = static_cast<feature_map>(9);
  expect(p, {"params.phi", "feature_map", "got 9"});
  p = {};
  p.eps = -1.f;
  expect(p, {"params.eps", ">= 0", "got -1"});
  p.eps = std::numeric_limits<float>::infinity();
  expect(p, {"params.eps", "finite"});
  p = {};
  p.scale = std::numeric_limits<float>::quiet_NaN();
  expect(p, {"params.scale", "finite"});
  // Decay: causal only, each gamma in (0, 1].
  const float good[Hq] = {1.f, 0.5f, 0.9f, 0.1f}, zero[Hq] = {1.f, 0.f, 1.f, 1.f}, big[Hq] = {1.f, 1.f, 1.f, 1.5f};
  const float nan_decay[Hq] = {1.f, 1.f, std::numeric_limits<float>::quiet_NaN(), 1.f};
  p = {};
  p.decay = good;
  expect(p, {"params.decay", "causal", "causal = false"});
  p.causal = true;
  p.decay = zero;
  expect(p, {"params.decay[1]", "(0, 1]", "got 0"});
  p.decay = big;
  expect(p, {"params.decay[3]", "(0, 1]", "got 1.5"});
  p.decay = nan_decay;
  expect(p, {"params.decay[2]", "(0, 1]", "nan"});
  // Projection: required (m x d, finite) for favor_positive, absent otherwise.
  const favor_projection proj = make_favor_projection(8, D, 1), proj_bad_d = make_favor_projection(8, D + 1, 1);
  p = {};
  p.phi = feature_map::favor_positive;
  expect(p, {"params.projection", "favor_positive", "make_favor_projection", "got (0, 0)"});
  p.projection = proj_bad_d;
  expect(p, {"params.projection", "head_dim 6", "(8, 7)"});
  favor_projection proj_nan = proj;
  proj_nan.values[13] = std::numeric_limits<float>::infinity();
  p.projection = proj_nan;
  expect(p, {"params.projection(2, 1)", "finite", "inf"});
  p.projection = proj;
  p.scale = -1.f;
  expect(p, {"params.scale", ">= 0", "got -1"});
  p = {};
  p.projection = proj;
  expect(p, {"params.projection", "empty", "elu_plus_one", "(8, 6)"});
}

TEST_CASE("state and step arguments are validated before anything is written") {
  const index_t B = 2, N = 4, Hq = 2, Hkv = 1, D = 3;
  const qkv in(B, N, N, Hq, Hkv, D, D, 2);
  tensor4<float> out(B, N, Hq, D), out1(B, 1, Hq, D);
  const float sentinel = -777.f;
  std::fill(out.buf.begin(), out.buf.end(), sentinel);
  std::fill(out1.buf.begin(), out1.buf.end(), sentinel);
  linear_params p;
  p.causal = true;
  linear_attention_state good(B, Hq, D, D);
  const auto good_s = good.s;
  auto check_state = [&](linear_attention_state<float>& st, const linear_params& pp,
                         std::initializer_list<std::string> parts) {
    test::require_error([&] { linear_attention(in.q.view, in.k.view, in.v.view, out.view, pp, st); }, parts);
    test::require_error(
        [&] {
          linear_attention_step(st, in.q.view.slice(1, 0, 1), in.k.view.slice(1, 0, 1), in.v.view.slice(1, 0, 1),
                                out1.view, pp);
        },
        parts);
    CHECK(test::untouched(out.buf, sentinel));
    CHECK(test::untouched(out1.buf, sentinel));
    CHECK(st.position == 0);
  };
  linear_params nc = p;
  nc.causal = false;
  check_state(good, nc, {"params.causal", "true", "got false"});
  CHECK(good.s == good_s);
  linear_attention_state wrong_b(B + 1, Hq, D, D), wrong_h(B, Hq + 1, D, D), wrong_f(B, Hq, D + 2, D),
      wrong_v(B, Hq, D, D - 1);
  check_state(wrong_b, p, {"state.batch", "2 (as q)", "got 3"});
  check_state(wrong_h, p, {"state.heads", "2 (a state per query head) or 1 (a state per kv head)", "got 3"});
  check_state(wrong_f, p, {"state.features", "elu_plus_one", "got 5"});
  check_state(wrong_v, p, {"state.value_dim", "got 2"});
  linear_attention_state broken = good;
  broken.z.pop_back();
  check_state(broken, p, {"state", "storage"});
  // A state per kv head (Hkv = 1 here) serves query heads of equal decay only.
  linear_attention_state per_kv(B, Hkv, D, D);
  const float unequal[Hq] = {0.9f, 0.8f};
  linear_params pd = p;
  pd.decay = unequal;
  check_state(per_kv, pd, {"params.decay[1]", "equal decay", "got 0.8"});
  CHECK(per_kv.s == std::vector<float>(per_kv.s.size(), 0.f));
  // A step needs one position.
  tensor4<float> out2(B, 2, Hq, D);
  test::require_error(
      [&] {
        linear_attention_step(good, in.q.view.slice(1, 0, 2), in.k.view.slice(1, 0, 2), in.v.view.slice(1, 0, 2),
                              out2.view, p);
      },
      {"linear_attention_step", "q_t", "sequence length 1", "got 2"});
  CHECK(good.position == 0);
  test::require_error([] { (void)linear_attention_state<float>(1, -1, 2, 2); }, {"linear_attention_state", "heads", "-1"});
}
