// attnkit::cuda::linear_attention on the CPU bench's shapes (bench_linear): B1 H4, F = Dv = D
// (elu_plus_one), N in {1k..64k}, D in {64, 128}, causal and not, f32 and bf16 inputs; FAVOR+
// (m = 2D random features) at N = 8k, D = 64. Timed with CUDA events around each call (manual time).
//
// Counters as the CPU bench counts them: GFLOPs = 4 * B * H * N * F * Dv / time (the two GEMM-shaped
// products phi(K)^T V and phi(Q) S; the causal form's intra-chunk products, the feature maps and
// FAVOR+'s projections are real work not counted) and pct_peak against the GPU's FP32 FMA peak (the
// kernels accumulate in float on the FMA units for every input type).
#include <attnkit/cuda/linear.cuh>  // first: includes the core headers the way nvcc wants them

#include "cuda_bench_common.cuh"

using namespace attnkit;
using namespace attnkit::bench_cuda;

namespace {

template <class T>
void run(benchmark::State& state, index_t N, index_t D, bool causal, bool favor) {
  const index_t B = 1, H = 4;
  const auto n = std::size_t(B * N * H * D);
  device_array<T> q(n, 1), k(n, 2), v(n, 3);
  device_array<float> out(n, 4);
  linear_params p;
  p.causal = causal;
  favor_projection proj;
  if (favor) {
    proj = make_favor_projection(2 * D, D, 5);
    p.phi = feature_map::favor_positive;
    p.projection = proj;
  }
  auto call = [&] {
    cuda::linear_attention(bshd<const T>(q.ptr, B, N, H, D), bshd<const T>(k.ptr, B, N, H, D),
                           bshd<const T>(v.ptr, B, N, H, D), bshd(out.ptr, B, N, H, D), p);
  };
  const double seconds = time_calls(state, call);
  const double F = favor ? 2.0 * double(D) : double(D);
  const double gflops = 4.0 * double(B * H * N) * F * double(D) * double(state.iterations()) / seconds / 1e9;
  state.counters["GFLOPs"] = gflops;
  state.counters["pct_peak"] = 100.0 * gflops / (1e3 * peaks().fp32_tflops);
}

template <class T>
void register_all(const char* type) {
  auto add = [&](const std::string& name, auto&& fn) {
    benchmark::RegisterBenchmark(name.c_str(), fn)->UseManualTime()->Unit(benchmark::kMicrosecond);
  };
  for (bool causal : {false, true})
    for (index_t D : {64, 128})
      for (index_t N : {1024, 4096, 16384, 65536})
        add(std::string("cuda_linear/") + type + (causal ? "/causal" : "/full") + "/D" + std::to_string(D) + "/N" +
                std::to_string(N),
            [=](benchmark::State& s) { run<T>(s, N, D, causal, false); });
  for (bool causal : {false, true})
    add(std::string("cuda_linear_favor/") + type + (causal ? "/causal" : "/full") + "/D64/m128/N8192",
        [=](benchmark::State& s) { run<T>(s, 8192, 64, causal, true); });
}

}  // namespace

int main(int argc, char** argv) {
  return run_main(argc, argv, [] {
    register_all<float>("f32");
    register_all<bf16>("bf16");
  });
}
