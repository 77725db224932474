// attnkit quick start: views over your own memory, one call, results in place.
#include <attnkit/attnkit.hpp>

#include <cstdio>
#include <random>
#include <vector>

int main() {
  const attnkit::index_t B = 1, N = 8, H = 2, D = 16;  // batch, sequence, heads, head dim
  std::vector<float> q(B * N * H * D), k(q.size()), v(q.size()), out(q.size());
  std::mt19937 gen(42);
  std::normal_distribution<float> normal;
  for (auto* buf : {&q, &k, &v})
    for (float& x : *buf) x = normal(gen);

  // Views say how the memory is laid out: here [batch][seq][head][dim].
  auto qv = attnkit::bshd(q.data(), B, N, H, D);
  auto kv = attnkit::bshd(k.data(), B, N, H, D);
  auto vv = attnkit::bshd(v.data(), B, N, H, D);
  auto ov = attnkit::bshd(out.data(), B, N, H, D);

  attnkit::attention_params params;
  params.causal = true;  // decoder-style masking
  attnkit::reference_attention(qv, kv, vv, ov, params);

  for (attnkit::index_t i = 0; i < N; ++i)
    std::printf("token %lld head 0: out[0..3] = %+.4f %+.4f %+.4f %+.4f\n", static_cast<long long>(i),
                ov(0, i, 0, 0), ov(0, i, 0, 1), ov(0, i, 0, 2), ov(0, i, 0, 3));
  return 0;
}
