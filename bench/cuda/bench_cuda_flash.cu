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

#include <benchmark/benchmark.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

using namespace attnkit;

namespace {

struct gpu_peaks {
  std::string name;
  int cc_major = 0, cc_minor = 0, sms = 0;
  double clock_ghz = 0;            // cudaDevAttrClockRate: the peak (boost) SM clock
  double tensor_16bit_tflops = 0;  // dense bf16/f16 mma with f32 accumulation
  double fp32_tflops = 0;          // FMA
  double dram_gbs = 0;             // 2 (DDR) x memory clock x bus width
};

// Peak = SMs x clock x (FLOP per clock per SM). Per-SM rates: bf16/f16 tensor cores with f32
// accumulate 2048 (sm_80, A100), 4096 (sm_90, H100), 8192 (sm_100), 1024 for other 8.x (sm_86/89
// workstation parts; GeForce runs f32 accumulation at half that); FP32 FMA 2 x 64 lanes on sm_80,
// 2 x 128 otherwise.
gpu_peaks query_peaks() {
  gpu_peaks g;
  int dev = 0, v = 0;
  cudaGetDevice(&dev);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, dev);
  g.name = prop.name;
  cudaDeviceGetAttribute(&g.cc_major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&g.cc_minor, cudaDevAttrComputeCapabilityMinor, dev);
  cudaDeviceGetAttribute(&g.sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&v, cudaDevAttrClockRate, dev);
  g.clock_ghz = v / 1e6;
  int mem_khz = 0, bus_bits = 0;
  cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, dev);
  cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev);
  g.dram_gbs = 2.0 * mem_khz * 1e3 * (bus_bits / 8.0) / 1e9;
  const int cc = g.cc_major * 10 + g.cc_minor;
  const double tensor_per_sm = cc == 80 ? 2048 : g.cc_major == 9 ? 4096 : g.cc_major >= 10 ? 8192 : 1024;
  const double fp32_per_sm = cc == 80 ? 128 : 256;
  g.tensor_16bit_tflops = g.sms * g.clock_ghz * 1e9 * tensor_per_sm / 1e12;
  g.fp32_tflops = g.sms * g.clock_ghz * 1e9 * fp32_per_sm / 1e12;
  return g;
}

const gpu_peaks& peaks() {
  static const gpu_peaks g = query_peaks();
  return g;
}

template <class T>
struct device_array {
  T* ptr = nullptr;
  explicit device_array(std::size_t n, std::uint64_t seed) {
    cuda::detail::check(cudaMalloc(&ptr, std::max<std::size_t>(n, 1) * sizeof(T)), "bench", "cudaMalloc");
    std::mt19937_64 g(seed);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<T> h(n);
    for (auto& x : h) x = T(u(g));
    cuda::detail::check(cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "bench",
                        "cudaMemcpy");
  }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  ~device_array() { cudaFree(ptr); }
};

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
  call();  // warm-up: module load, smem opt-in, memory pool
  cuda::synchronize();
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  double seconds = 0;
  for (auto _ : state) {
    cudaEventRecord(start);
    call();
    cudaEventRecord(stop);
    cuda::synchronize();
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    seconds += ms / 1e3;
    state.SetIterationTime(ms / 1e3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
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
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device visible: CUDA benches skipped\n");
    return 0;
  }
  const gpu_peaks& g = peaks();
  benchmark::AddCustomContext("gpu", g.name);
  benchmark::AddCustomContext("gpu_cc", std::to_string(g.cc_major) + "." + std::to_string(g.cc_minor));
  benchmark::AddCustomContext("gpu_sms", std::to_string(g.sms));
  benchmark::AddCustomContext("gpu_clock_ghz", std::to_string(g.clock_ghz));
  benchmark::AddCustomContext("peak_tensor_16bit_tflops", std::to_string(g.tensor_16bit_tflops));
  benchmark::AddCustomContext("peak_fp32_tflops", std::to_string(g.fp32_tflops));
  benchmark::AddCustomContext("peak_dram_gbs", std::to_string(g.dram_gbs));
  register_all<bf16>("bf16");
  register_all<float>("f32");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
