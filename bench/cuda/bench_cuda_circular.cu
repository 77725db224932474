// attnkit::cuda::circular_attention (cuFFT) on the CPU bench's shapes (bench_circular): B1 H8, f32,
// non-causal N in {1k..256k} x D in {64, 128}; causal and causal + renormalize N in {4k, 16k, 64k},
// D128. Timed with CUDA events around each call (manual time; the call includes making and
// releasing its cuFFT plans).
//
// Counters as the CPU bench counts them: GFLOPs = B * H * D * 2 * 2.5 * M * log2(M) (one forward and
// one inverse real transform per head and channel at the transform length M) / time; GBs = bytes of
// v read, out written and logits read, 4 * B * N * H * (2 D + 1), / time, and pct_bw against the
// GPU's DRAM bandwidth.
#include <attnkit/cuda/circular.cuh>  // first: includes the core headers the way nvcc wants them

#include <cmath>

#include "cuda_bench_common.cuh"

using namespace attnkit;
using namespace attnkit::bench_cuda;

namespace {

constexpr index_t B = 1, H = 8;

void run(benchmark::State& state, index_t N, index_t D, int mode) {
  const auto n = std::size_t(B * N * H * D);
  device_array<float> l(std::size_t(B * H * N), 1), v(n, 2), out(n, 3);
  circular_params p;
  p.causal = mode >= 1;
  p.renormalize = mode == 2;
  auto call = [&] {
    cuda::circular_attention(bhs<const float>(l.ptr, B, H, N), bshd<const float>(v.ptr, B, N, H, D),
                             bshd(out.ptr, B, N, H, D), p);
  };
  const double seconds = time_calls(state, call);
  const bool cyclic = !p.causal && kernels::fft_is_good_size(N);
  const double M = double(cyclic ? N : kernels::fft_good_size(2 * N - 1)), it = double(state.iterations());
  state.counters["GFLOPs"] = double(B * H * D) * 2 * 2.5 * M * std::log2(M) * it / seconds / 1e9;
  const double gbs = 4.0 * double(B * N * H) * double(2 * D + 1) * it / seconds / 1e9;
  state.counters["GBs"] = gbs;
  state.counters["pct_bw"] = 100.0 * gbs / peaks().dram_gbs;
}

void register_all() {
  auto add = [](const std::string& name, index_t N, index_t D, int mode) {
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) { run(s, N, D, mode); })
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  };
  for (index_t N : {1024, 4096, 8192, 16384, 65536, 262144})
    for (index_t D : {64, 128}) add("cuda_circular/N" + std::to_string(N) + "/D" + std::to_string(D), N, D, 0);
  for (index_t N : {4096, 16384, 65536}) {
    add("cuda_circular_causal/N" + std::to_string(N) + "/D128", N, 128, 1);
    add("cuda_circular_renorm/N" + std::to_string(N) + "/D128", N, 128, 2);
  }
}

}  // namespace

int main(int argc, char** argv) { return run_main(argc, argv, register_all); }
