// Linear attention for generation: one parallel causal pass over the prompt fills a recurrent state,
// then each new token costs one linear_attention_step, O(features x value_dim) per head whatever the
// position. The program checks the steps against a parallel pass over the whole sequence and prints
// the time per step as the sequence grows.
#include <attnkit/attnkit.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  using attnkit::index_t;
  const index_t B = 1, H = 4, D = 64;      // batch, heads, head dim
  const index_t prompt = 4000, steps = 4096;  // prompt length, generated tokens
  const index_t N = prompt + steps;

  // Stand-ins for the projections of a model: random q, k, v for every position.
  std::vector<float> q(B * N * H * D), k(q.size()), v(q.size()), out(q.size()), full(q.size());
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.f, 0.5f);
  for (auto* buf : {&q, &k, &v})
    for (float& x : *buf) x = normal(gen);
  auto view = [&](std::vector<float>& t) { return attnkit::bshd(t.data(), B, N, H, D); };

  attnkit::linear_params p;
  p.phi = attnkit::feature_map::elu_plus_one;
  p.causal = true;
  const float decay[H] = {0.9f, 0.97f, 0.99f, 1.f};  // RetNet-style per-head decay (1 = none)
  p.decay = decay;

  // Prefill: parallel chunked pass over the prompt, leaving the state at position `prompt`.
  attnkit::linear_attention_state state(B, H, attnkit::linear_feature_dim(p, D), D);
  const auto t0 = std::chrono::steady_clock::now();
  attnkit::linear_attention(view(q).slice(1, 0, prompt), view(k).slice(1, 0, prompt), view(v).slice(1, 0, prompt),
                            view(out).slice(1, 0, prompt), p, state);
  const double prefill_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("prefill: %lld tokens in %.2f ms (state at position %lld)\n", static_cast<long long>(prompt),
              prefill_ms, static_cast<long long>(state.position));

  // Decode: one step per token; time blocks of steps to show the cost does not grow with position.
  // (The per-token views are made before the clock starts: building a view validates its shape.)
  struct token_views {
    attnkit::tensor_view<float, 4> q, k, v, out;
  };
  std::vector<token_views> tokens;
  for (index_t i = prompt; i < N; ++i)
    tokens.push_back({view(q).slice(1, i, i + 1), view(k).slice(1, i, i + 1), view(v).slice(1, i, i + 1),
                      view(out).slice(1, i, i + 1)});
  const index_t block = 1024;
  for (index_t t = 0; t < steps; t += block) {
    const index_t n = std::min(block, steps - t);
    const auto s0 = std::chrono::steady_clock::now();
    for (index_t i = t; i < t + n; ++i) {
      const token_views& tv = tokens[static_cast<std::size_t>(i)];
      attnkit::linear_attention_step(state, tv.q, tv.k, tv.v, tv.out, p);
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - s0).count();
    std::printf("steps at positions %5lld..%5lld: %.2f us per token\n", static_cast<long long>(prompt + t),
                static_cast<long long>(prompt + t + n - 1), us / double(n));
  }

  // The same sequence in one parallel causal pass: the recurrent outputs agree to float rounding.
  attnkit::linear_attention(view(q), view(k), view(v), view(full), p);
  double max_diff = 0, max_out = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    max_diff = std::max(max_diff, double(std::abs(out[i] - full[i])));
    max_out = std::max(max_out, double(std::abs(full[i])));
  }
  std::printf("prefill + %lld steps vs one parallel pass over %lld tokens: max |diff| = %.3g (max |out| = %.3g)\n",
              static_cast<long long>(steps), static_cast<long long>(N), max_diff, max_out);
  return max_diff <= 1e-4 * max_out ? 0 : 1;
}
