// The one place where a runtime size picks a compiled kernel: the head dim. Kernels are compiled
// for the padded head dims 64, 96, 128 and 256; any head dim (and value dim) up to 256 runs in the
// smallest bucket that holds it, its tail zero-filled in shared memory, so odd head dims need no
// extra instantiation. Element types are template parameters of the launchers, not switched here.
#pragma once

#include <string_view>
#include <type_traits>

#include "attnkit/cuda/core.cuh"

namespace attnkit::cuda::detail {

inline constexpr index_t max_head_dim = 256;

// Calls f(std::integral_constant<int, P>{}) with P the smallest of {64, 96, 128, 256} that is >= d;
// throws attnkit::error (before anything is launched) when d > 256.
template <class F>
void dispatch_head_dim(std::string_view fn, index_t d, F&& f) {
  if (d <= 64) return f(std::integral_constant<int, 64>{});
  if (d <= 96) return f(std::integral_constant<int, 96>{});
  if (d <= 128) return f(std::integral_constant<int, 128>{});
  if (d <= max_head_dim) return f(std::integral_constant<int, 256>{});
  attnkit::detail::fail(fn, "q/k/v", "head_dim and value_dim <= 256 (the CUDA kernels' largest tile)",
                        attnkit::detail::concat(d));
}

}  // namespace attnkit::cuda::detail
