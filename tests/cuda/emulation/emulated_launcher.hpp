// The Launcher of the attnkit::cuda plan headers (flash_plan.cuh, linear_plan.cuh, ...) for the CPU
// emulation: kernels run on host threads through warp_emulator.hpp, workspaces are host memory,
// uploads are plain copies and cuFFT's transforms plain DFTs (test sizes only: O(M^2) per row).
// Define ATTNKIT_CUDA_EMULATION before including any attnkit/cuda header.
#pragma once

#include <cstddef>
#include <cmath>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

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
  // cuFFT's in-place R2C (forward: M reals -> M / 2 + 1 complex numbers, X_k = sum_t x_t e^(-2 pi i k t / M))
  // and C2R (inverse: y_t = sum_k X_k e^(+2 pi i k t / M) over all M frequencies, the upper half being
  // the conjugates of the lower; unnormalized) on `count` rows of `row` floats, as plain DFTs in double.
  void fft(float* rows, index_t M, index_t row, index_t count, bool forward) {
    const double two_pi = 6.283185307179586476925286766559;
    std::vector<double> in(static_cast<std::size_t>(row));
    for (index_t r = 0; r < count; ++r) {
      float* x = rows + r * row;
      for (index_t i = 0; i < row; ++i) in[std::size_t(i)] = x[i];
      if (forward) {
        for (index_t k = 0; k <= M / 2; ++k) {
          double re = 0, im = 0;
          for (index_t t = 0; t < M; ++t) {
            const double ang = -two_pi * double((k * t) % M) / double(M);
            re += in[std::size_t(t)] * std::cos(ang);
            im += in[std::size_t(t)] * std::sin(ang);
          }
          x[2 * k] = float(re);
          x[2 * k + 1] = float(im);
        }
      } else {
        for (index_t t = 0; t < M; ++t) {
          double acc = 0;
          for (index_t k = 0; k < M; ++k) {
            const index_t kk = k <= M / 2 ? k : M - k;  // X_k = conj(X_(M-k)) for the upper half
            const double re = in[std::size_t(2 * kk)], im = (k <= M / 2 ? 1 : -1) * in[std::size_t(2 * kk + 1)];
            const double ang = two_pi * double((k * t) % M) / double(M);
            acc += re * std::cos(ang) - im * std::sin(ang);
          }
          x[t] = float(acc);
        }
      }
    }
  }
};

}  // namespace attnkit::test::cuda_cases
