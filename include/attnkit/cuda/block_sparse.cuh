// attnkit::cuda::block_sparse_attention: the CPU operator's semantics (ops/block_sparse.hpp: exact
// softmax attention over the active (query block, key block) tiles of a block_mask, with every
// attention_params field) on NVIDIA GPUs of compute capability 8.0 or newer. It runs the flash
// kernel (flash_kernel.cuh, its Sparse instantiation: the same tiles, tensor-core and FMA paths and
// head-dim buckets as cuda::flash_attention): each thread block visits only the key tiles that hold
// an active mask block for one of its rows and masks the rest elementwise, so inactive tiles cost
// neither loads nor arithmetic. Include from a .cu file compiled by nvcc (-std=c++20) and link attnkit::cuda.
//
// Memory. The views, params.bias, params.alibi_slopes and params.kv_lengths are as for
// cuda::flash_attention (device memory; alibi_slopes and kv_lengths are device arrays). The mask is
// the host object: the call expands it into per-block lists of key-tile runs and a byte per
// (batch, head, query block, key block) (batch / heads once when the mask broadcasts them), copies
// them to a stream-ordered workspace on `stream`, and returns without waiting; the mask may be
// destroyed when the call returns. The key dimension is never split (no split-KV decode path).
//
// Errors: see launch.cuh. Bad shapes, parameters or a mask that does not fit the problem throw
// attnkit::error with the CPU operator's checks and messages (function name
// "cuda::block_sparse_attention") before anything is launched; so do host pointers, head dims above
// 256 (ATTNKIT_CUDA_MAX_HEAD_DIM) and GPUs older than sm_80. Precision as cuda::flash_attention.
#pragma once

#include <type_traits>

#include "attnkit/cuda/launch.cuh"  // first: includes the core headers the way nvcc wants them
#include "attnkit/cuda/block_sparse_plan.cuh"

namespace attnkit::cuda {

// out (and optionally lse) = softmax attention restricted to the active tiles of `mask`, exactly as
// attnkit::block_sparse_attention defines it; rows with no allowed key get 0 and lse -inf.
template <class TQ, class TK, class TV, class TO, class TL = TO>
void block_sparse_attention(tensor_view<TQ, 4> q, tensor_view<TK, 4> k, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                            const block_mask& mask, const attention_params& params = {}, tensor_view<TL, 3> lse = {},
                            cudaStream_t stream = nullptr) {
  constexpr std::string_view fn = "cuda::block_sparse_attention";
  const detail::flash_args a = detail::prepare_block_sparse(fn, q, k, v, out, mask, params, lse);
  if (a.rows == 0) return;  // no output row

  const detail::device_info dev = detail::require_softmax_device(fn, q, k, v, out, lse, params);

  detail::stream_launcher launch{fn, dev, stream};
  detail::dispatch_block_sparse<std::remove_const_t<TQ>, TO, TL>(fn, a, mask, launch);
}

}  // namespace attnkit::cuda
