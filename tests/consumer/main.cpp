// Calls attnkit::reference_attention the way a downstream project would; exit 0 on the right answer.
#include <attnkit/attnkit.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  // One query, two keys of head_dim 1 and scale 1: logits (0, ln 2) give weights (1/3, 2/3).
  std::vector<float> q{1.f}, k{0.f, std::log(2.f)}, v{3.f, 6.f}, out(1);
  attnkit::attention_params p;
  p.scale = 1.f;
  attnkit::reference_attention(attnkit::bshd(q.data(), 1, 1, 1, 1), attnkit::bshd(k.data(), 1, 2, 1, 1),
                               attnkit::bshd(v.data(), 1, 2, 1, 1), attnkit::bshd(out.data(), 1, 1, 1, 1), p);
  std::printf("out = %f (expected 5)\n", out[0]);
  return std::fabs(out[0] - 5.f) < 1e-5f ? 0 : 1;
}
