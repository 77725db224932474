// Shared main: records the CPU, the SIMD target and the thread limit in the JSON context.
#include <benchmark/benchmark.h>

#include <fstream>
#include <string>

#include <attnkit/attnkit.hpp>

namespace {
std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}
}  // namespace

int main(int argc, char** argv) {
  benchmark::AddCustomContext("cpu_model", cpu_model());
  benchmark::AddCustomContext("attnkit_simd_arch", attnkit::simd::arch_name());
  benchmark::AddCustomContext("attnkit_simd_width", std::to_string(attnkit::simd::width));
  benchmark::AddCustomContext("attnkit_max_threads", std::to_string(attnkit::max_threads()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
