// attnkit::cuda::linear_attention: the CPU operator's semantics (ops/linear.hpp: feature maps
// including FAVOR+, causal with per-head decay, non-causal, normalize, eps, grouped heads) on NVIDIA
// GPUs of compute capability 8.0 or newer. Include from a .cu file compiled by nvcc (-std=c++20) and
// link attnkit::cuda (CMake option ATTNKIT_WITH_CUDA=ON). How it computes: linear_kernel.cuh.
//
// Memory. q, k, v and out point to memory the current device can read or write. params.decay and
// params.projection are HOST memory: the checks read them (as on the CPU: decays in (0, 1], finite
// projection entries), and they are copied to a stream-ordered workspace on `stream` (with the
// non-causal form's per-(batch, kv head) states, features x (value_dim + 2) accumulator elements
// each), so the caller may free them when the call returns. Work is queued on `stream` and the call
// returns without waiting.
//
// Errors: see launch.cuh. Bad shapes or parameters throw attnkit::error with the CPU operator's
// checks and messages (function name "cuda::linear_attention") before anything is launched; so do
// host pointers for q/k/v/out, GPUs older than sm_80, and feature counts whose chunk does not fit a
// block's shared memory (above 592 features in float, 291 in double).
//
// Precision: accumulation in float, in double when an input is double (as on the CPU); bf16/f16
// inputs are widened exactly. Sums run in a fixed order: results are bitwise reproducible.
#pragma once

#include <type_traits>

#include "attnkit/cuda/launch.cuh"  // first: includes the core headers the way nvcc wants them
#include "attnkit/cuda/linear_plan.cuh"

namespace attnkit::cuda {

// out = linear attention of (q, k, v) as attnkit::linear_attention defines it (views as there,
// pointing to device memory), queued on `stream`.
template <class TQ, class TK, class TV, class TO>
void linear_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                      const linear_params& params, cudaStream_t stream = nullptr) {
  constexpr std::string_view fn = "cuda::linear_attention";
  using Acc = attnkit::detail::linear_accum_t<TQ, TK, TV>;
  detail::linear_call<Acc> c = detail::prepare_linear<Acc>(fn, q, k, v, out, params);
  if (c.empty()) return;  // no output element

  const detail::device_info dev = detail::current_device(fn);
  detail::require_sm80(fn, dev);
  detail::require_device_view(fn, "q", q, dev);
  detail::require_device_view(fn, "k", k, dev);
  detail::require_device_view(fn, "v", v, dev);
  detail::require_device_view(fn, "out", out, dev);

  detail::stream_launcher launch{fn, dev, stream};
  detail::run_linear<Acc, std::remove_const_t<TQ>, std::remove_const_t<TK>, std::remove_const_t<TV>, TO>(
      fn, std::move(c), launch);
}

}  // namespace attnkit::cuda
