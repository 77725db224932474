// attnkit::cuda::flash_attention and attnkit::cuda::merge_attention_states: the CPU operators'
// semantics (DESIGN.md, ops/reference.hpp) on NVIDIA GPUs of compute capability 8.0 or newer.
// Include from a .cu file compiled by nvcc (-std=c++20) and link attnkit::cuda (CMake option
// ATTNKIT_WITH_CUDA=ON).
//
// Memory. Every view (q, k, v, out, lse, params.bias) points to memory the current device can read
// or write; so do params.alibi_slopes and params.kv_lengths, which unlike on the CPU are DEVICE
// pointers. Their contents are not inspected on the host (that would need a synchronous copy): a
// kv_lengths value outside [0, Nk] is clamped into it instead of being reported, and a non-finite
// slope propagates like any NaN input. Work is queued on `stream` and the call returns without
// waiting. The split-KV path (few query rows, long key sequences) takes a workspace of
// splits x B x Hq x Nq x (Dv + 1) accumulator elements from the device's stream-ordered memory pool
// (cudaMallocAsync / cudaFreeAsync on `stream`); on devices without memory pools it is not used.
//
// Errors: see launch.cuh. Bad shapes, strides or parameters throw attnkit::error with the same
// checks and messages as the CPU operators (function name "cuda::flash_attention"), before anything
// is launched; so do host pointers, head dims above 256 (or above ATTNKIT_CUDA_MAX_HEAD_DIM, see
// dispatch.cuh) and GPUs older than sm_80. CUDA runtime failures throw attnkit::error carrying
// cudaGetErrorString; faults during execution surface at the next synchronisation, e.g.
// attnkit::cuda::synchronize(stream).
//
// Precision: q, k, v are all float, double, bf16 or f16 (one type for the three). bf16/f16 run
// Q K^T and P V on tensor cores (P rounded to the input type, float accumulation); float and double
// use FMA in their own precision. Outputs are float or double.
#pragma once

#include <climits>
#include <cstdint>
#include <type_traits>

#include "attnkit/cuda/launch.cuh"  // first: includes the core headers the way nvcc wants them
#include "attnkit/cuda/dispatch.cuh"
#include "attnkit/cuda/flash_kernel.cuh"
#include "attnkit/cuda/flash_plan.cuh"

namespace attnkit::cuda {

// out = softmax(logits) v for every (batch, query, head), exactly as attnkit::reference_attention
// defines it for every attention_params field; lse (optional, logical (batch, head, seq)) receives
// the log-sum-exp. Fully masked rows give out = 0 and lse = -inf. Any strides, grouped-query heads,
// head dims (and value dims) up to 256. See the header comment for memory, streams and errors.
template <class TQ, class TK, class TV, class TO, class TL = TO>
void flash_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                     const attention_params& params = {}, tensor_view<TL, 3> lse = {},
                     cudaStream_t stream = nullptr) {
  constexpr std::string_view fn = "cuda::flash_attention";
  const detail::flash_args a = detail::prepare_flash(fn, q, k, v, out, params, lse);
  if (a.rows == 0) return;  // no output row

  const detail::device_info dev = detail::require_softmax_device(fn, q, k, v, out, lse, params);

  detail::stream_launcher launch{fn, dev, stream};
  detail::dispatch_flash<std::remove_const_t<TQ>, TO, TL>(fn, a, launch, dev.memory_pools);
}

// Combines two attention results over disjoint key sets of the same queries (split-KV, cascades,
// ring attention): with m = max(lse_a, lse_b),
//   o = (exp(lse_a - m) o_a + exp(lse_b - m) o_b) / (exp(lse_a - m) + exp(lse_b - m)),
//   lse = m + log(exp(lse_a - m) + exp(lse_b - m)).
// A side with lse = -inf (no key) contributes nothing, both -inf give o = 0 and lse = -inf, never
// NaN (kernels::merge_lse). o may be the same view as o_a or o_b and lse the same as lse_a or lse_b
// (in-place merge). lse is optional. Views are (batch, seq, head, dim) and (batch, head, seq).
template <class TA, class TLA, class TB, class TLB, class TO, class TL = TO>
void merge_attention_states(tensor_view<TA, 4> o_a, tensor_view<TLA, 3> lse_a, tensor_view<TB, 4> o_b,
                            tensor_view<TLB, 3> lse_b, tensor_view<TO, 4> o, tensor_view<TL, 3> lse = {},
                            cudaStream_t stream = nullptr) {
  using TI = std::remove_const_t<TA>;
  using TLI = std::remove_const_t<TLA>;
  constexpr std::string_view fn = "cuda::merge_attention_states";
  detail::validate_merge(fn, o_a, lse_a, o_b, lse_b, o, lse);
  if (o_a.extent(0) == 0 || o_a.extent(1) == 0 || o_a.extent(2) == 0) return;  // no row to merge

  const detail::device_info dev = detail::current_device(fn);
  detail::require_device_view(fn, "o_a", o_a, dev);
  detail::require_device_view(fn, "lse_a", lse_a, dev);
  detail::require_device_view(fn, "o_b", o_b, dev);
  detail::require_device_view(fn, "lse_b", lse_b, dev);
  detail::require_device_view(fn, "o", o, dev);
  detail::require_device_view(fn, "lse", lse, dev);

  detail::stream_launcher launch{fn, dev, stream};
  detail::run_merge_pair<detail::merge_acc_t<TI, TLI, TO, TL>, TI, TLI, TO, TL>(
      fn, tensor_view<const TI, 4>(o_a), tensor_view<const TLI, 3>(lse_a), tensor_view<const TI, 4>(o_b),
      tensor_view<const TLI, 3>(lse_b), o, lse, launch);
}

}  // namespace attnkit::cuda
