# Optional CUDA backend (ATTNKIT_WITH_CUDA=ON), included by the top-level CMakeLists.txt. Defines the
# INTERFACE target attnkit::cuda: consumers link it from their .cu files to get attnkit's CUDA
# headers (include/attnkit/cuda/*.cuh), the CUDA runtime, cuFFT and the ATTNKIT_WITH_CUDA definition. The
# library stays header-only: kernels are instantiated in the consumer's translation units, for the
# consumer's CMAKE_CUDA_ARCHITECTURES (sm_80 or newer).
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  # Ampere and Hopper; must be set before enable_language(CUDA) picks its own default.
  set(CMAKE_CUDA_ARCHITECTURES "80;90")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

add_library(attnkit_cuda INTERFACE)
add_library(attnkit::cuda ALIAS attnkit_cuda)
set_target_properties(attnkit_cuda PROPERTIES EXPORT_NAME cuda)
target_link_libraries(attnkit_cuda INTERFACE attnkit CUDA::cudart CUDA::cufft)  # cuFFT: circular_attention
target_compile_definitions(attnkit_cuda INTERFACE ATTNKIT_WITH_CUDA=1)
# C++20 for .cu files. Spelled as a flag because CMake 3.25 does not know the cuda_std_20 feature
# for nvcc 13. --expt-relaxed-constexpr: Eigen 3.4 (core/types.hpp) calls constexpr host functions
# from __host__ __device__ code and documents the flag as required for CUDA builds; attnkit's own
# kernels do not rely on it.
target_compile_options(attnkit_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr>)
install(TARGETS attnkit_cuda EXPORT attnkitTargets)

if(ATTNKIT_TOP_LEVEL AND ATTNKIT_BUILD_BENCH)
  find_package(benchmark QUIET)
  if(benchmark_FOUND)
    add_subdirectory(bench/cuda)
  else()
    message(STATUS "attnkit: Google Benchmark not found, CUDA benches not built")
  endif()
endif()
