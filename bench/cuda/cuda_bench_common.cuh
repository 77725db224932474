// Shared by the CUDA benches: the GPU's peak rates, random device arrays, CUDA-event timing and a
// main() that exits 0 with a message when no GPU is visible. Include after the attnkit/cuda
// launcher headers.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace attnkit::bench_cuda {

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
inline gpu_peaks query_peaks() {
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

inline const gpu_peaks& peaks() {
  static const gpu_peaks g = query_peaks();
  return g;
}

// n random elements uniform in (-1, 1), rounded to T, in device memory.
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

// Times call() with CUDA events on the default stream (manual time), after one warm-up call (module
// load, shared-memory opt-in, memory pool). Returns the total seconds over the iterations.
template <class Call>
double time_calls(benchmark::State& state, Call&& call) {
  call();
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
  return seconds;
}

// main() of a CUDA bench: registers the benchmarks (register_all) when a GPU is visible and runs
// them with the GPU's name and peaks in the JSON context; without a GPU prints that and returns 0.
inline int run_main(int argc, char** argv, const std::function<void()>& register_all) {
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
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace attnkit::bench_cuda
