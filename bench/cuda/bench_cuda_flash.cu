// attnkit::cuda::flash_attention on the CPU benches' shapes (bench_flash): prefill B1 H8
// N in {512..8k}, D in {64, 128}, causal and not, bf16 and f32; decode B1 Hq32 Hkv8 D128
// Nk in {4k, 32k, 128k}, bf16 and f32 (the GPU runs f16 like bf16). Timed with CUDA events around
// each call (manual time), after a warm-up call.
//
// Counters: TFLOPs (4 * Nq * Nk * D per head, halved for causal with Nq == Nk, as DESIGN.md counts)
// and pct_peak against the GPU's dense peak for the input type; decode also GBs (K and V read once)
// and pct_bw. Peaks come from the device's attributes (see gpu_peaks below; the per-SM rates are
// the published ones for each architecture, so the fractions are approximate for parts with other
// clocks or fused-off units). Without a GPU the executable prints that and exits 0.
#include <attnkit/cuda/flash.cuh>  // first: includes the core headers the way nvcc wants them

#include "cuda_bench_common.cuh"

using namespace attnkit;
using namespace attnkit::bench_cuda;

namespace {

// Times flash_attention on B x Nq x Hq x D queries against Nk keys of Hkv heads, BSHD, f32 output.
template <class T>
void run(benchmark::State& state, index_t Nq, index_t Nk, index_t Hq, index_t Hkv, index_t D, bool causal,
         bool decode) {
  const index_t B = 1;
  device_array<T> q(std::size_t(B * Nq * Hq * D), 1), k(std::size_t(B * Nk * Hkv * D), 2),
      v(std::size_t(B * Nk * Hkv * D), 3);
  device_array<float> out(std::size_t(B * Nq * Hq * D), 4);
  attention_params p;
  p.causal = causal;
  auto call = [&] {
    cuda::flash_attention(bshd<const T>(q.ptr, B, Nq, Hq, D), bshd<const T>(k.ptr, B, Nk, Hkv, D),
                          bshd<const T>(v.ptr, B, Nk, Hkv, D), bshd(out.ptr, B, Nq, Hq, D), p);
  };
  const double seconds = time_calls(state, call);
  const double iters = double(state.iterations());
  const double flops = 4.0 * double(B * Hq * Nq * Nk * D) / (causal && Nq == Nk ? 2.0 : 1.0);
  const double tflops = flops * iters / seconds / 1e12;
  const bool tensor = !std::is_same_v<T, float>;
  state.counters["TFLOPs"] = tflops;
  state.counters["pct_peak"] = 100.0 * tflops / (tensor ? peaks().tensor_16bit_tflops : peaks().fp32_tflops);
  if (decode) {
    const double bytes = 2.0 * double(B * Hkv * Nk * D) * sizeof(T);
    const double gbs = bytes * iters / seconds / 1e9;
    state.counters["GBs"] = gbs;
    state.counters["pct_bw"] = 100.0 * gbs / peaks().dram_gbs;
  }
}

template <class T>
void register_all(const char* type) {
  for (index_t D : {64, 128})
    for (bool causal : {false, true})
      for (index_t N : {512, 1024, 2048, 4096, 8192}) {
        const std::string name = std::string("cuda_flash_prefill/") + type + "/D" + std::to_string(D) +
                                 (causal ? "/causal" : "/full") + "/N" + std::to_string(N);
        benchmark::RegisterBenchmark(name.c_str(),
                                     [=](benchmark::State& s) { run<T>(s, N, N, 8, 8, D, causal, false); })
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
      }
  for (index_t Nk : {4096, 32768, 131072}) {
    const std::string name =
        std::string("cuda_flash_decode/") + type + "/Hq32/Hkv8/D128/Nk" + std::to_string(Nk);
    benchmark::RegisterBenchmark(name.c_str(),
                                 [=](benchmark::State& s) { run<T>(s, 1, Nk, 32, 8, 128, true, true); })
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  return run_main(argc, argv, [] {
    register_all<bf16>("bf16");
    register_all<float>("f32");
  });
}
