// Operators called from several std::threads at once (each with its own OpenMP team inside) give
// the same bits as serial calls: no shared mutable state beyond per-thread scratch. Run under
// ThreadSanitizer in CI.
#include "flash_cases.hpp"

#include <thread>

using namespace attnkit;
using test::tensor3;
using test::tensor4;

namespace {

struct problem {
  tensor4<float> q, k, v, out, out_serial;
  tensor3<float> lse, lse_serial;
  attention_params p;
  problem(index_t nq, std::uint64_t seed)
      : q(2, nq, 4, 24), k(2, 700, 2, 24), v(2, 700, 2, 24), out(2, nq, 4, 24), out_serial(2, nq, 4, 24),
        lse(2, 4, nq), lse_serial(2, 4, nq) {
    test::fill_uniform(q, seed);
    test::fill_uniform(k, seed + 1);
    test::fill_uniform(v, seed + 2);
    p.causal = seed % 2 == 0;
  }
  template <class Op>
  void run(Op&& op, bool serial) {
    op(q.view, k.view, v.view, serial ? out_serial.view : out.view, p, serial ? lse_serial.view : lse.view);
  }
  bool same() const {
    return std::memcmp(out.buf.data(), out_serial.buf.data(), out.buf.size() * sizeof(float)) == 0 &&
           std::memcmp(lse.buf.data(), lse_serial.buf.data(), lse.buf.size() * sizeof(float)) == 0;
  }
};

template <class Op>
void check_concurrent(Op op) {
  std::vector<problem> ps;
  for (int t = 0; t < 4; ++t) ps.emplace_back(t % 2 ? 3 : 90, std::uint64_t(10 * t + 1));
  // Concurrent calls first, so that they also race on whatever an operator initialises on first use
  // (FFT plan cache, per-thread scratch); the serial calls then give the expected bits.
  std::vector<std::thread> threads;
  for (auto& p : ps) threads.emplace_back([&p, op] { p.run(op, false); });
  for (auto& t : threads) t.join();
  for (auto& p : ps) p.run(op, true);
  for (const auto& p : ps) CHECK(p.same());
}

}  // namespace

TEST_CASE("concurrent calls from 4 threads equal serial calls") {
  SECTION("flash_attention") {
    check_concurrent([](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) {
      flash_attention(q, k, v, out, p, lse);
    });
  }
  SECTION("reference_attention") {
    check_concurrent([](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) {
      reference_attention(q, k, v, out, p, lse);
    });
  }
  SECTION("sparse_attention") {
    check_concurrent([](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) {
      sparse_pattern pat;
      pat.window_left = 100;
      pat.global_tokens = {3};
      pat.random_blocks = 2;
      pat.block_size = 32;
      sparse_attention(q, k, v, out, pat, p, lse);
    });
  }
  SECTION("block_sparse_attention with xattention_select") {
    check_concurrent([](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) {
      xattention_params xp;
      xp.block = 64;
      xp.causal = p.causal;
      block_sparse_attention(q, k, v, out, xattention_select(q, k, xp), p, lse);
    });
  }
  SECTION("linear_attention (FAVOR+)") {
    check_concurrent([](auto q, auto k, auto v, auto out, const attention_params&, auto) {
      const auto proj = make_favor_projection(64, q.extent(3), 5);
      linear_params lp;
      lp.phi = feature_map::favor_positive;
      lp.projection = proj;
      linear_attention(q, k, v, out, lp);
    });
  }
  SECTION("linear_attention (causal, decayed, continuing a state) and linear_attention_step") {
    // Causal linear attention needs Nq == Nk: q serves as keys and values too.
    check_concurrent([](auto q, auto, auto, auto out, const attention_params&, auto) {
      const index_t B = q.extent(0), N = q.extent(1), H = q.extent(2), D = q.extent(3);
      const float decay[4] = {0.9f, 1.f, 0.99f, 0.5f};
      linear_params lp;
      lp.causal = true;
      lp.decay = decay;
      linear_attention_state st(B, H, D, D);
      linear_attention(q.slice(1, 0, N - 1), q.slice(1, 0, N - 1), q.slice(1, 0, N - 1), out.slice(1, 0, N - 1), lp, st);
      linear_attention_step(st, q.slice(1, N - 1, N), q.slice(1, N - 1, N), q.slice(1, N - 1, N),
                            out.slice(1, N - 1, N), lp);
    });
  }
  SECTION("circular_attention (every mode) on averaged_key_logits") {
    // CAT's logits and values share the sequence: q serves as values.
    for (int mode = 0; mode < 3; ++mode)
      check_concurrent([mode](auto q, auto k, auto, auto out, const attention_params&, auto) {
        tensor3<float> logits(q.extent(0), q.extent(2), q.extent(1));
        averaged_key_logits(q, k, logits.view);
        circular_params cp;
        cp.causal = mode >= 1;
        cp.renormalize = mode == 2;
        circular_attention(logits.view, q, out, cp);
      });
  }
  SECTION("merge_attention_states") {
    check_concurrent([](auto q, auto k, auto v, auto out, const attention_params& p, auto lse) {
      const index_t B = q.extent(0), Nq = q.extent(1), H = q.extent(2), D = v.extent(3);
      tensor4<float> a(B, Nq, H, D), b(B, Nq, H, D);
      tensor3<float> la(B, H, Nq), lb(B, H, Nq);
      flash_attention(q, k.slice(1, 0, 300), v.slice(1, 0, 300), a.view, p, la.view);
      flash_attention(q, k.slice(1, 300, 700), v.slice(1, 300, 700), b.view, {}, lb.view);
      merge_attention_states(a.view, la.view, b.view, lb.view, out, lse);
    });
  }
}
