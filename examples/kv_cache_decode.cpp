// A KV cache that grows token by token: prefill a prompt with causal flash attention, then decode
// one token at a time, attending to the cache through kv_lengths. Two sequences of different
// lengths share one batch. The "model" is random projections; what matters is the cache handling
// and the time per decode step.
//
// Usage: kv_cache_decode [prompt_len=2048] [steps=256]
#include <attnkit/attnkit.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using attnkit::index_t;

int main(int argc, char** argv) {
  const index_t prompt = argc > 1 ? std::atol(argv[1]) : 2048;
  const index_t steps = argc > 2 ? std::atol(argv[2]) : 256;
  const index_t B = 2, Hq = 32, Hkv = 8, D = 128, capacity = prompt + steps;
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  auto random_fill = [&](auto& v) {
    for (auto& x : v) x = typename std::decay_t<decltype(v)>::value_type(normal(gen));
  };

  // The cache stores K and V in f16, [batch][position][kv head][dim]; capacity is fixed up front.
  std::vector<attnkit::f16> k_cache(std::size_t(B * capacity * Hkv * D)), v_cache(k_cache.size());
  auto k_view = attnkit::bshd(k_cache.data(), B, capacity, Hkv, D);
  auto v_view = attnkit::bshd(v_cache.data(), B, capacity, Hkv, D);
  // Sequence 1 has a prompt shorter by a quarter: kv_lengths tells each batch how much is real.
  // Queries are aligned bottom-right, so its prompt occupies the last 3/4 of the query rows (the
  // first rows see no key and come out as zeros).
  std::vector<index_t> length{prompt, prompt - prompt / 4};

  // Prefill: the prompt's keys and values go into the cache, its queries attend causally.
  std::vector<float> q(std::size_t(B * prompt * Hq * D)), out(q.size());
  random_fill(q);
  random_fill(k_cache);
  random_fill(v_cache);
  attnkit::attention_params prefill;
  prefill.causal = true;
  prefill.kv_lengths = length.data();
  const auto t0 = std::chrono::steady_clock::now();
  attnkit::flash_attention(attnkit::bshd(q.data(), B, prompt, Hq, D), k_view.slice(1, 0, prompt),
                           v_view.slice(1, 0, prompt), attnkit::bshd(out.data(), B, prompt, Hq, D), prefill);
  const double prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("prefill: %lld tokens x %lld sequences in %.3f s (%.0f tokens/s)\n", (long long)prompt, (long long)B,
              prefill_s, double(prompt * B) / prefill_s);

  // Decode: each step appends one token per sequence and attends to the whole cache so far.
  std::vector<float> q1(std::size_t(B * Hq * D)), out1(q1.size());
  std::vector<attnkit::f16> k_new(std::size_t(Hkv * D)), v_new(k_new.size());
  attnkit::attention_params decode;
  decode.kv_lengths = length.data();  // causal is implicit: the new token sees every cached key
  double decode_s = 0;
  for (index_t step = 0; step < steps; ++step) {
    random_fill(q1);
    for (index_t b = 0; b < B; ++b) {
      random_fill(k_new);
      random_fill(v_new);
      for (index_t h = 0; h < Hkv; ++h)
        for (index_t d = 0; d < D; ++d) {
          k_view(b, length[b], h, d) = k_new[std::size_t(h * D + d)];
          v_view(b, length[b], h, d) = v_new[std::size_t(h * D + d)];
        }
      ++length[b];
    }
    const auto s0 = std::chrono::steady_clock::now();
    attnkit::flash_attention(attnkit::bshd(q1.data(), B, 1, Hq, D), k_view, v_view,
                             attnkit::bshd(out1.data(), B, 1, Hq, D), decode);
    decode_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - s0).count();
  }
  std::printf("decode: %lld steps x %lld sequences in %.3f s: %.0f tokens/s, %.3f ms per step\n", (long long)steps,
              (long long)B, decode_s, double(steps * B) / decode_s, 1e3 * decode_s / double(steps));
  std::printf("final lengths: %lld and %lld; out[0] head 0 = %+.4f %+.4f %+.4f\n", (long long)length[0],
              (long long)length[1], out1[0], out1[1], out1[2]);
  return 0;
}
