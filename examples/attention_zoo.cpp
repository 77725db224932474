// The attention zoo: every operator family of attnkit on the same input, with its time and its
// deviation from exact softmax attention. Inputs have locality (query i resembles keys near i),
// the regime where sparse methods are designed to work; change `locality` to 0 for plain noise.
//
// Usage: attention_zoo [N=4096] [D=64] [heads=4]
#include <attnkit/attnkit.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

using attnkit::index_t;

namespace {

double seconds_of(const std::function<void()>& f) {
  f();  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double relative_error(const std::vector<float>& got, const std::vector<float>& exact) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += double(got[i] - exact[i]) * double(got[i] - exact[i]);
    den += double(exact[i]) * double(exact[i]);
  }
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) {
  const index_t N = argc > 1 ? std::atol(argv[1]) : 4096, D = argc > 2 ? std::atol(argv[2]) : 64,
                H = argc > 3 ? std::atol(argv[3]) : 4, B = 1;
  const float locality = 1.5f;
  std::mt19937 gen(3);
  std::normal_distribution<float> normal;
  // A slowly drifting "topic" vector per position makes nearby tokens similar.
  std::vector<float> q(std::size_t(B * N * H * D)), k(q.size()), v(q.size()), exact(q.size()), out(q.size());
  std::vector<float> topic(static_cast<std::size_t>(D));
  for (auto& t : topic) t = normal(gen);
  for (index_t i = 0; i < N; ++i) {
    for (auto& t : topic) t = 0.98f * t + 0.2f * normal(gen);
    for (index_t h = 0; h < H; ++h)
      for (index_t d = 0; d < D; ++d) {
        const std::size_t at = std::size_t(((i * H) + h) * D + d);
        q[at] = locality * topic[std::size_t(d)] + normal(gen);
        k[at] = locality * topic[std::size_t(d)] + normal(gen);
        v[at] = normal(gen);
      }
  }
  auto Q = attnkit::bshd(q.data(), B, N, H, D), K = attnkit::bshd(k.data(), B, N, H, D),
       V = attnkit::bshd(v.data(), B, N, H, D), O = attnkit::bshd(out.data(), B, N, H, D);

  const double t_exact = seconds_of([&] { attnkit::flash_attention(Q, K, V, attnkit::bshd(exact.data(), B, N, H, D)); });
  std::printf("attention zoo: N=%lld D=%lld heads=%lld, %d threads\n\n", (long long)N, (long long)D, (long long)H,
              attnkit::max_threads());
  std::printf("%-44s %10s %9s %14s\n", "method", "time [ms]", "speed-up", "rel. error");
  std::printf("%-44s %10.2f %9.2f %14s\n", "flash_attention (exact softmax)", 1e3 * t_exact, 1.0, "0 (reference)");
  auto report = [&](const std::string& name, const std::function<void()>& f) {
    std::fill(out.begin(), out.end(), 0.f);
    const double t = seconds_of(f);
    std::printf("%-44s %10.2f %9.2f %14.4f\n", name.c_str(), 1e3 * t, t_exact / t, relative_error(out, exact));
  };

  // Linear attention with each feature map (FAVOR+ with 256 orthogonal random features).
  const auto favor = attnkit::make_favor_projection(256, D, 42);
  for (auto phi : {attnkit::feature_map::elu_plus_one, attnkit::feature_map::relu, attnkit::feature_map::identity,
                   attnkit::feature_map::cosine, attnkit::feature_map::favor_positive}) {
    attnkit::linear_params lp;
    lp.phi = phi;
    if (phi == attnkit::feature_map::favor_positive) lp.projection = favor;
    if (phi == attnkit::feature_map::identity || phi == attnkit::feature_map::cosine) lp.normalize = false;
    report(std::string("linear_attention, ") + attnkit::feature_map_name(phi), [&] { attnkit::linear_attention(Q, K, V, O, lp); });
  }

  // Sparse: a sliding window of 256 keys plus 16 global tokens.
  attnkit::sparse_pattern sp;
  sp.window_left = sp.window_right = 128;
  for (index_t g = 0; g < 16; ++g) sp.global_tokens.push_back(g);
  report("sparse_attention, window 256 + 16 global", [&] { attnkit::sparse_attention(Q, K, V, O, sp); });

  // Block-sparse with XAttention selection (selection time included).
  attnkit::xattention_params xp;
  xp.threshold = 0.9f;
  double density = 0;
  report("block_sparse + xattention_select (t=0.9)", [&] {
    const auto mask = attnkit::xattention_select(Q, K, xp);
    density = mask.density();
    attnkit::block_sparse_attention(Q, K, V, O, mask);
  });
  std::printf("%-44s density of the selected mask: %.3f\n", "", density);

  // CAT: one logit per token and head (averaged-key variant), circular convolution through FFTs.
  std::vector<float> logits(std::size_t(B * H * N));
  report("circular_attention (CAT, averaged keys)", [&] {
    attnkit::averaged_key_logits(Q, K, attnkit::bhs(logits.data(), B, H, N));
    attnkit::circular_attention(attnkit::bhs(logits.data(), B, H, N), V, O);
  });
  std::printf("\nrel. error = ||out - exact||_F / ||exact||_F over all outputs.\n");
  return 0;
}
