// Host-side preparation and sequencing of cuda::linear_attention, free of CUDA runtime calls: the
// CPU operator's checks, the column tiling, the parameter arrays the kernels read (FAVOR+
// projection, decays) and the order of launches. A `Launcher` (see flash_plan.cuh) runs them; it
// must also provide
//   void upload(void* device_dst, const void* host_src, std::size_t bytes);   // stream-ordered copy
// so the same sequence runs on a GPU (launch.cuh's stream_launcher) and in the CPU emulation test.
#pragma once

#include <climits>
#include <cmath>
#include <cstddef>
#include <string_view>
#include <type_traits>
#include <vector>

#include <vector_types.h>  // dim3

#include "attnkit/cuda/core.cuh"
#include "attnkit/cuda/linear_kernel.cuh"
#include "attnkit/cuda/cpu_ops.cuh"

namespace attnkit::cuda::detail {

// Every sm_80+ GPU lets a block opt in to 99 KiB of shared memory (see flash_kernel.cuh); the plan
// never depends on the device, so a call computes the same sums everywhere.
inline constexpr std::size_t linear_smem_budget = 99 * 1024;

template <class Acc>
std::size_t linear_smem_bytes(index_t features, index_t dv_tile) {
  return static_cast<std::size_t>(make_linear_smem(features, dv_tile).total) * sizeof(Acc);
}

// Value columns per block: up to 64 (fewer when value_dim is smaller), halved until the block's
// shared memory fits the budget; 0 when not even 8 columns fit.
template <class Acc>
index_t linear_dv_tile(index_t features, index_t value_dim) {
  index_t t = 64;
  while (t > 8 && t / 2 >= value_dim) t /= 2;
  while (t >= 8 && linear_smem_bytes<Acc>(features, t) > linear_smem_budget) t /= 2;
  return t >= 8 ? t : 0;
}

// The largest feature count that fits with 8 columns (for the error message).
template <class Acc>
index_t linear_max_features() {
  index_t f = 1;
  while (linear_smem_bytes<Acc>(f + 1, 8) <= linear_smem_budget) ++f;
  return f;
}

template <class T, std::size_t R>
void copy_view_strides(index_t (&dst)[R], const tensor_view<T, R>& v) {
  for (std::size_t ax = 0; ax < R; ++ax) dst[ax] = v.stride(ax);
}

// A validated call: kernel arguments (device pointers still to be filled in for wt, decay and
// state) and the host copies of the parameter arrays to upload.
template <class Acc>
struct linear_call {
  linear_args a;
  bool causal = false;
  std::vector<Acc> wt;      // FAVOR+: sqrt(scale) W^T, [head_dim][features]
  std::vector<float> decay;  // per query head, empty without decay
  bool empty() const { return a.batch == 0 || a.q_heads == 0 || a.q_len == 0 || a.value_dim == 0; }
};

// Validates with the CPU operator's checks and messages (params.decay and params.projection are
// read here, so they are HOST memory) plus the shared-memory limit on the feature count.
template <class Acc, class TQ, class TK, class TV, class TO>
linear_call<Acc> prepare_linear(std::string_view fn, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                                const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out, const linear_params& p) {
  attnkit::detail::check_linear_element_types<TQ, TK, TV, TO>();
  const attnkit::detail::linear_shape ls = attnkit::detail::validate_linear(fn, q, k, v, out, p);
  const attention_shape& s = ls.s;
  linear_call<Acc> c;
  linear_args& a = c.a;
  a.q = q.data(), a.k = k.data(), a.v = v.data(), a.out = out.data();
  copy_view_strides(a.qs, q), copy_view_strides(a.ks, k), copy_view_strides(a.vs, v), copy_view_strides(a.os, out);
  a.batch = s.batch, a.q_len = s.q_len, a.kv_len = s.kv_len, a.q_heads = s.q_heads, a.kv_heads = s.kv_heads;
  a.group = s.group(), a.head_dim = s.head_dim, a.features = ls.features, a.value_dim = s.value_dim;
  a.phi = static_cast<linear_phi>(static_cast<int>(p.phi));
  a.normalize = p.normalize;
  a.eps = p.eps;
  a.log_eps = p.eps > 0.f ? std::log(static_cast<double>(static_cast<Acc>(p.eps))) : 0.0;
  c.causal = p.causal;
  a.dv_tile = linear_dv_tile<Acc>(a.features, a.value_dim);
  if (a.dv_tile == 0)
    attnkit::detail::fail(fn, p.phi == feature_map::favor_positive ? "params.projection" : "q",
                          attnkit::detail::concat("at most ", linear_max_features<Acc>(),
                                                  " features (shared memory of one block)"),
                          attnkit::detail::concat(a.features, " features"));
  if (p.phi == feature_map::favor_positive) {
    const Acc scale = attnkit::detail::effective_scale<Acc>(p.scale, s.head_dim);
    const Acc root = std::sqrt(scale);
    a.half_scale = static_cast<double>(scale / 2);
    a.half_log_m = static_cast<double>(std::log(static_cast<Acc>(a.features)) / 2);
    c.wt.resize(static_cast<std::size_t>(s.head_dim * a.features));
    for (index_t f = 0; f < a.features; ++f)
      for (index_t d = 0; d < s.head_dim; ++d)
        c.wt[static_cast<std::size_t>(d * a.features + f)] = root * static_cast<Acc>(p.projection(f, d));
  }
  if (p.decay != nullptr) c.decay.assign(p.decay, p.decay + s.q_heads);
  return c;
}

// The launches of a prepared, non-empty call. One workspace holds the uploaded parameters and,
// for the non-causal form, the per-(batch, kv head) states.
template <class Acc, class TQ, class TK, class TV, class TO, class Launcher>
void run_linear(std::string_view fn, linear_call<Acc> c, Launcher& launch) {
  linear_args& a = c.a;
  const linear_state_layout sl = make_linear_state_layout(a.features, a.value_dim);
  const index_t state_elems = c.causal ? 0 : a.batch * a.kv_heads * sl.per_head;
  const std::size_t wt_bytes = c.wt.size() * sizeof(Acc), state_bytes = std::size_t(state_elems) * sizeof(Acc);
  const std::size_t decay_bytes = c.decay.size() * sizeof(float);
  auto ws = launch.workspace(state_bytes + wt_bytes + decay_bytes + 16);
  unsigned char* base = static_cast<unsigned char*>(ws.ptr);
  a.state = state_elems ? base : nullptr;
  if (wt_bytes) {
    a.wt = base + state_bytes;
    launch.upload(base + state_bytes, c.wt.data(), wt_bytes);
  }
  if (decay_bytes) {
    a.decay = reinterpret_cast<const float*>(base + state_bytes + wt_bytes);
    launch.upload(base + state_bytes + wt_bytes, c.decay.data(), decay_bytes);
  }
  const std::size_t smem = linear_smem_bytes<Acc>(a.features, a.dv_tile);
  const index_t tiles = (a.value_dim + a.dv_tile - 1) / a.dv_tile;
  auto grid_x = [&](index_t blocks) {
    attnkit::detail::require(blocks <= INT_MAX, fn, "q", "at most 2^31 - 1 thread blocks", blocks);
    return static_cast<unsigned>(blocks);
  };
  if (c.causal) {
    launch.kernel("linear_causal_kernel", &linear_causal_kernel<Acc, TQ, TK, TV, TO>,
                  dim3(grid_x(a.batch * a.q_heads), static_cast<unsigned>(tiles)), linear_threads, smem, a);
    return;
  }
  const index_t chunks = (a.q_len + linear_rows - 1) / linear_rows;
  const unsigned kv_blocks = grid_x(a.batch * a.kv_heads), q_blocks = grid_x(a.batch * a.q_heads * chunks);
  launch.kernel("linear_state_kernel", &linear_state_kernel<Acc, TK, TV>, dim3(kv_blocks, static_cast<unsigned>(tiles)),
                linear_threads, smem, a);
  launch.kernel("linear_query_kernel", &linear_query_kernel<Acc, TQ, TO>, dim3(q_blocks, static_cast<unsigned>(tiles)),
                linear_threads, smem, a);
}

}  // namespace attnkit::cuda::detail
