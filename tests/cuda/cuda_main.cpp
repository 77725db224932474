// main() of the CUDA test executables: without a usable GPU (no device, no driver, or nothing of
// compute capability 8.0+) it prints why and exits with 77, which ctest's SKIP_RETURN_CODE reports
// as "skipped" instead of failed. Otherwise it runs Catch2.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cstdio>

int main(int argc, char** argv) {
  constexpr int skipped = 77;
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    std::printf("SKIPPED: no CUDA device visible (%s)\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return skipped;
  }
  int dev = 0, major = 0, minor = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, dev);
  std::printf("CUDA device %d: %s, compute capability %d.%d\n", dev, prop.name, major, minor);
  if (major < 8) {
    std::printf("SKIPPED: attnkit's CUDA kernels need compute capability 8.0 or newer\n");
    return skipped;
  }
  return Catch::Session().run(argc, argv);
}
