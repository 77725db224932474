// The Launcher of the attnkit::cuda plan headers (flash_plan.cuh, linear_plan.cuh, ...) for the CPU
// emulation: kernels run on host threads through warp_emulator.hpp, workspaces are host memory and
// uploads are plain copies.
// Define ATTNKIT_CUDA_EMULATION before including any attnkit/cuda header.
#pragma once

#include <cstddef>
#include <cstring>
#include <memory>
#include <utility>

#include "warp_emulator.hpp"

namespace attnkit::test::cuda_cases {

struct emulated_launcher {
  template <class... Params, class... Args>
  void kernel(const char*, void (*k)(Params...), dim3 grid, int threads, std::size_t smem_bytes, Args&&... args) {
    attnkit_emu::launch(k, grid, dim3(static_cast<unsigned>(threads)), smem_bytes, std::forward<Args>(args)...);
  }
  struct buffer {
    std::unique_ptr<double[]> storage;  // double-aligned, enough for float or double workspaces
    void* ptr = nullptr;
  };
  // Filled with NaN bytes (0xFF), so a kernel reading workspace it never wrote shows up.
  buffer workspace(std::size_t bytes) {
    buffer b;
    b.storage = std::make_unique<double[]>(bytes / sizeof(double) + 1);
    std::memset(b.storage.get(), 0xff, (bytes / sizeof(double) + 1) * sizeof(double));
    b.ptr = b.storage.get();
    return b;
  }
  void upload(void* dst, const void* src, std::size_t bytes) {
    if (bytes) std::memcpy(dst, src, bytes);
  }
};

}  // namespace attnkit::test::cuda_cases
