// CAT (circular-convolutional attention) over 256k tokens: O(N log N) time, O(N) memory.
// Prints the time of each call, peak resident memory, and checks a few output rows against the
// definition summed directly (O(N) per row).
//
// Usage: cat_long_context [tokens (default 262144)] [heads (default 4)] [head_dim (default 64)]
#include <attnkit/attnkit.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace {

// Peak resident set size in MiB (VmHWM of /proc/self/status; 0 where unavailable).
double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  using attnkit::index_t;
  const index_t N = argc > 1 ? std::atoll(argv[1]) : 262144;
  const index_t H = argc > 2 ? std::atoll(argv[2]) : 4;
  const index_t D = argc > 3 ? std::atoll(argv[3]) : 64;
  const index_t B = 1;

  // CAT's logits: one scalar per token and head (in a model, x W_A from the merged query-key
  // projection); here random, with values v.
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  std::vector<float> logits(static_cast<std::size_t>(B * H * N)), v(static_cast<std::size_t>(B * N * H * D));
  std::vector<float> out(v.size());
  for (float& x : logits) x = 2.f * normal(gen);
  for (float& x : v) x = normal(gen);
  const double input_mib = double((logits.size() + v.size()) * sizeof(float)) / (1 << 20);
  const double rss_before = peak_rss_mib();

  auto lv = attnkit::bhs(logits.data(), B, H, N);  // logical (batch, head, seq)
  auto vv = attnkit::bshd(v.data(), B, N, H, D);   // logical (batch, seq, head, dim)
  auto ov = attnkit::bshd(out.data(), B, N, H, D);

  std::printf("CAT: %lld tokens, %lld heads, head_dim %lld, %d threads, SIMD %s\n", static_cast<long long>(N),
              static_cast<long long>(H), static_cast<long long>(D), attnkit::max_threads(), attnkit::simd::arch_name());
  std::printf("inputs %.0f MiB, output %.0f MiB (an N x N attention matrix per head would be %.0f GiB)\n", input_mib,
              double(out.size() * sizeof(float)) / (1 << 20), double(N) * double(N) * 4.0 / (1 << 30));

  for (int mode = 0; mode < 3; ++mode) {
    attnkit::circular_params p;
    p.causal = mode >= 1;
    p.renormalize = mode == 2;
    const char* name = mode == 0 ? "non-causal" : mode == 1 ? "causal" : "causal+renormalize";
    double best = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      attnkit::circular_attention(lv, vv, ov, p);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    // Check rows against the definition: out[i] = sum_j w[(i - j) mod N] v[j] (causal: j <= i,
    // renormalized by sum_{m <= i} w[m]), in double.
    double max_err = 0;
    for (index_t h : {index_t(0), H - 1}) {
      std::vector<double> w(static_cast<std::size_t>(N));
      double m = -1e300, s = 0;
      for (index_t j = 0; j < N; ++j) m = std::max(m, double(lv(0, h, j)));
      for (index_t j = 0; j < N; ++j) s += w[j] = std::exp(double(lv(0, h, j)) - m);
      for (double& x : w) x /= s;
      for (index_t i : {index_t(0), index_t(1), N / 3, N - 1}) {
        double mass = 0;
        for (index_t k = 0; k <= i; ++k) mass += w[k];
        for (index_t d : {index_t(0), D - 1}) {
          double acc = 0;
          for (index_t j = 0; j < N; ++j) {
            if (p.causal && j > i) break;
            acc += w[(i - j + N) % N] * double(vv(0, j, h, d));
          }
          if (p.renormalize) acc /= mass;
          max_err = std::max(max_err, std::abs(acc - double(ov(0, i, h, d))));
        }
      }
    }
    std::printf("  %-19s %8.1f ms (best of 3)   max |error| on checked rows %.1e\n", name, best * 1e3, max_err);
  }
  const double rss = peak_rss_mib();
  std::printf("peak RSS %.0f MiB (%.0f MiB before the first call: the difference is attnkit's scratch)\n", rss,
              rss_before);
  return 0;
}
