// The one place where a runtime size picks a compiled kernel: the head dim. Kernels are compiled
// for the padded head dims 64, 96, 128 and 256; any head dim (and value dim) up to 256 runs in the
// smallest bucket that holds it, its tail zero-filled in shared memory, so odd head dims need no
// extra instantiation. Element types are template parameters of the launchers, not switched here.
#pragma once

#include <string>
#include <string_view>
#include <type_traits>

#include "attnkit/cuda/core.cuh"

// ATTNKIT_CUDA_MAX_HEAD_DIM (64, 96, 128 or 256; default 256) leaves the larger buckets uncompiled
// to save compile time and binary size; calls that would need them throw attnkit::error. Define it
// identically in every translation unit of a program (it changes inline functions).
#if !defined(ATTNKIT_CUDA_MAX_HEAD_DIM)
#define ATTNKIT_CUDA_MAX_HEAD_DIM 256
#endif
static_assert(ATTNKIT_CUDA_MAX_HEAD_DIM == 64 || ATTNKIT_CUDA_MAX_HEAD_DIM == 96 ||
                  ATTNKIT_CUDA_MAX_HEAD_DIM == 128 || ATTNKIT_CUDA_MAX_HEAD_DIM == 256,
              "ATTNKIT_CUDA_MAX_HEAD_DIM must be one of the compiled tile widths 64, 96, 128, 256");

namespace attnkit::cuda::detail {

inline constexpr index_t max_head_dim = ATTNKIT_CUDA_MAX_HEAD_DIM;

inline std::string head_dim_limit() {
  return attnkit::detail::concat("head_dim and value_dim <= ", max_head_dim,
                                 " (the largest compiled tile, ATTNKIT_CUDA_MAX_HEAD_DIM)");
}

// Calls f(std::integral_constant<int, P>{}) with P the smallest compiled bucket that is >= d;
// throws attnkit::error (before anything is launched) when d exceeds max_head_dim.
template <class F>
void dispatch_head_dim(std::string_view fn, index_t d, F&& f) {
  if (d <= 64) return f(std::integral_constant<int, 64>{});
  if constexpr (max_head_dim >= 96)
    if (d <= 96) return f(std::integral_constant<int, 96>{});
  if constexpr (max_head_dim >= 128)
    if (d <= 128) return f(std::integral_constant<int, 128>{});
  if constexpr (max_head_dim >= 256)
    if (d <= 256) return f(std::integral_constant<int, 256>{});
  attnkit::detail::fail(fn, "q/k/v", head_dim_limit(), attnkit::detail::concat(d));
}

}  // namespace attnkit::cuda::detail
