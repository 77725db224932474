// Host-side planning and sequencing of flash launches, free of CUDA runtime calls and <<<...>>>:
// kernel arguments from validated views, the 16-byte load test, the split-KV plan and the order of
// kernels. The actual launching is delegated to a `Launcher`, which must provide
//   void kernel(const char* name, KernelPtr k, dim3 grid, int threads, std::size_t smem_bytes, Args... args);
//   Handle workspace(std::size_t bytes);   // Handle has a void* ptr, released when destroyed
// flash.cuh passes one that queues with <<<...>>> on the caller's stream (cudaMallocAsync for the
// workspace); the CPU emulation test in tests/cuda passes one that runs the same kernels on host
// threads, so everything here is exercised without a GPU.
#pragma once

#include <cstddef>
#include <climits>
#include <cstdint>
#include <string_view>

#include <vector_types.h>  // dim3

#include "attnkit/cuda/core.cuh"
#include "attnkit/cuda/dispatch.cuh"
#include "attnkit/cuda/flash_kernel.cuh"

namespace attnkit::cuda::detail {

inline index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
inline index_t round_up(index_t a, index_t b) { return ceil_div(a, b) * b; }

// True when a rank-4 view can be read in 16-byte chunks of `vec` elements along the dim axis: data
// 16-byte aligned, unit dim stride, dim extent and every other stride multiples of vec (so every
// row starts 16-byte aligned and a chunk never straddles the end of a row).
template <class T>
bool vector_loadable(const tensor_view<T, 4>& v, index_t vec) {
  if (reinterpret_cast<std::uintptr_t>(v.data()) % 16 != 0) return false;
  if (v.stride(3) != 1 || v.extent(3) % vec != 0) return false;
  for (std::size_t ax = 0; ax < 3; ++ax)
    if (v.stride(ax) % vec != 0) return false;
  return true;
}

template <class T, std::size_t R>
void copy_strides(index_t (&dst)[R], const tensor_view<T, R>& v) {
  for (std::size_t ax = 0; ax < R; ++ax) dst[ax] = v.stride(ax);
}

// Kernel arguments for validated views (shape `s`). Device pointers are taken as they are.
// row_blocks and split_keys are filled in by plan().
template <class TQ, class TK, class TV, class TO, class TL>
flash_args make_flash_args(const attention_shape& s, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                           const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out,
                           const attention_params& p, const tensor_view<TL, 3>& lse) {
  using storage = typename element_traits<std::remove_const_t<TQ>>::storage;
  const index_t vec = 16 / static_cast<index_t>(sizeof(storage));
  flash_args a;
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  copy_strides(a.qs, q);
  copy_strides(a.ks, k);
  copy_strides(a.vs, v);
  a.out = out.data();
  copy_strides(a.os, out);
  a.lse = lse.empty() ? nullptr : lse.data();
  if (a.lse != nullptr) copy_strides(a.ls, lse);
  const auto bias = attnkit::detail::broadcast_to(p.bias, {s.batch, s.q_heads, s.q_len, s.kv_len});
  a.bias = bias.empty() ? nullptr : bias.data();
  if (a.bias != nullptr) copy_strides(a.bs, bias);
  a.alibi = p.alibi_slopes;
  a.kv_lengths = p.kv_lengths;
  a.batch = s.batch;
  a.q_len = s.q_len;
  a.kv_len = s.kv_len;
  a.q_heads = s.q_heads;
  a.kv_heads = s.kv_heads;
  a.group = s.group();
  a.head_dim = s.head_dim;
  a.value_dim = s.value_dim;
  a.rows = (s.batch == 0 || s.q_heads == 0) ? 0 : s.q_len * a.group;  // 0: nothing to compute
  a.scale = attnkit::detail::effective_scale<double>(p.scale, s.head_dim);
  a.softcap = p.softcap;
  a.causal = p.causal;
  a.window_left = p.window_left;
  a.window_right = p.window_right;
  a.q_vec = vector_loadable(q, vec);
  a.k_vec = vector_loadable(k, vec);
  a.v_vec = vector_loadable(v, vec);
  return a;
}

// The element-type rules of cuda::flash_attention, as compile-time errors.
template <class TQ, class TK, class TV, class TO, class TL>
constexpr void check_flash_types() {
  using T = std::remove_const_t<TQ>;
  static_assert(is_input_element_v<T>,
                "q, k, v elements must be float, double, attnkit::bf16 or attnkit::f16");
  static_assert(std::is_same_v<T, std::remove_const_t<TK>> && std::is_same_v<T, std::remove_const_t<TV>>,
                "attnkit::cuda::flash_attention needs one element type for q, k and v");
  static_assert(is_output_element_v<TO> && is_output_element_v<TL>,
                "out and lse elements must be (non-const) float or double");
}

// Validates a flash call with the CPU operators' checks and messages (params.alibi_slopes and
// params.kv_lengths are device arrays, so their contents are not read here) plus the CUDA head-dim
// limit, and returns the kernel arguments. rows == 0 means there is no output row to compute.
template <class TQ, class TK, class TV, class TO, class TL>
flash_args prepare_flash(std::string_view fn, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                         const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out,
                         const attention_params& p, const tensor_view<TL, 3>& lse) {
  check_flash_types<TQ, TK, TV, TO, TL>();
  attention_params host_params = p;
  host_params.alibi_slopes = nullptr;
  host_params.kv_lengths = nullptr;
  const attention_shape s = attnkit::detail::validate_attention(fn, q, k, v, out, host_params, lse);
  const index_t widest = s.head_dim > s.value_dim ? s.head_dim : s.value_dim;
  attnkit::detail::require(widest <= max_head_dim, fn, "q/k/v", head_dim_limit(), widest);
  return make_flash_args(s, q, k, v, out, p, lse);
}

// Dispatches a prepared call to the kernel compiled for its head-dim bucket and runs it.
template <class T, class TO, class TL, class Launcher>
void dispatch_flash(std::string_view fn, const flash_args& a, Launcher& launch, bool can_split);

// How a launch is cut up. Key splitting (Flash-Decoding) pays when a (batch, kv head) has a single
// row block (decode: Nq * group <= block_m) and the grid is small. The plan depends on the problem
// shape only, never on the GPU, so a given call computes the same sums on every device.
struct flash_plan {
  index_t base_blocks = 0;  // row blocks x batch x kv heads (grid x)
  int splits = 1;           // grid y
  index_t split_keys = 0;   // keys per split, a multiple of block_n
  // Workspace of the split path, in accumulator elements: partial outputs [split][b][h][i][d], then
  // partial log-sum-exps [split][b][h][i].
  index_t ws_out_elems = 0, ws_lse_elems = 0;
};

inline constexpr index_t split_target_blocks = 512;  // a few waves even on 132-SM GPUs
inline constexpr index_t split_min_keys = 256;       // a shorter chunk costs more than it saves

inline int plan_splits(index_t rows, index_t block_m, index_t base_blocks, index_t kv_len, bool can_split) {
  if (!can_split || rows > block_m || kv_len < 2 * split_min_keys) return 1;
  index_t want = ceil_div(split_target_blocks, base_blocks);
  if (want > max_splits) want = max_splits;
  return want < 2 ? 1 : static_cast<int>(want);
}

// Fills a.row_blocks and a.split_keys and returns the plan. `can_split`: the workspace can be
// allocated (stream-ordered memory pools exist).
template <class Cfg>
flash_plan plan(flash_args& a, bool can_split) {
  flash_plan pl;
  a.row_blocks = ceil_div(a.rows, Cfg::block_m);
  pl.base_blocks = a.row_blocks * a.batch * a.kv_heads;
  const index_t whole = round_up(a.kv_len > Cfg::block_n ? a.kv_len : Cfg::block_n, Cfg::block_n);
  a.split_keys = whole;
  const int want = plan_splits(a.rows, Cfg::block_m, pl.base_blocks, a.kv_len, can_split);
  if (want < 2) return pl;
  index_t chunk = ceil_div(a.kv_len, want);
  if (chunk < split_min_keys) chunk = split_min_keys;
  chunk = round_up(chunk, Cfg::block_n);
  const index_t splits = ceil_div(a.kv_len, chunk);
  if (splits < 2) return pl;
  pl.splits = static_cast<int>(splits);
  a.split_keys = chunk;
  const index_t rows_total = a.batch * a.q_heads * a.q_len;
  pl.ws_out_elems = splits * rows_total * a.value_dim;
  pl.ws_lse_elems = splits * rows_total;
  return pl;
}

// The arguments of the split pass: same problem, outputs redirected to the workspace `ws` (of the
// accumulator type) laid out as flash_plan describes.
inline flash_args split_pass_args(const flash_args& a, const flash_plan& pl, void* ws,
                                  std::size_t acc_bytes) {
  flash_args part = a;
  part.out = ws;
  part.os[0] = a.q_heads * a.q_len * a.value_dim;  // batch
  part.os[1] = a.value_dim;                        // query
  part.os[2] = a.q_len * a.value_dim;              // head
  part.os[3] = 1;                                  // dim
  part.out_split_stride = a.batch * a.q_heads * a.q_len * a.value_dim;
  part.lse = static_cast<unsigned char*>(ws) + static_cast<std::size_t>(pl.ws_out_elems) * acc_bytes;
  part.ls[0] = a.q_heads * a.q_len;
  part.ls[1] = a.q_len;
  part.ls[2] = 1;
  part.lse_split_stride = a.batch * a.q_heads * a.q_len;
  return part;
}

// The launches of one flash call: one pass when the plan has a single split, else the split pass
// into the workspace and the fixed-order merge into out/lse.
template <class Cfg, class TO, class TL, class Launcher>
void run_flash(std::string_view fn, flash_args a, Launcher& launch, bool can_split) {
  using A = typename Cfg::acc;
  const flash_plan pl = plan<Cfg>(a, can_split);
  attnkit::detail::require(pl.base_blocks <= INT_MAX, fn, "q",
                           "at most 2^31 - 1 thread blocks (batch x kv heads x row blocks)", pl.base_blocks);
  const dim3 grid(static_cast<unsigned>(pl.base_blocks), static_cast<unsigned>(pl.splits));
  if (pl.splits == 1) {
    launch.kernel("flash_forward_kernel", &flash_forward_kernel<Cfg, TO, TL>, grid, Cfg::threads,
                  Cfg::smem_bytes, a);
    return;
  }
  const index_t rows_total = a.batch * a.q_heads * a.q_len;
  const index_t merge_blocks = ceil_div(rows_total, merge_warps);
  attnkit::detail::require(merge_blocks <= INT_MAX, fn, "q", "at most 2^31 - 1 merge blocks", merge_blocks);
  auto ws = launch.workspace(static_cast<std::size_t>(pl.ws_out_elems + pl.ws_lse_elems) * sizeof(A));
  launch.kernel("flash_forward_kernel (split-KV pass)", &flash_forward_kernel<Cfg, A, A>, grid, Cfg::threads,
                Cfg::smem_bytes, split_pass_args(a, pl, ws.ptr, sizeof(A)));
  const A* ws_o = static_cast<const A*>(ws.ptr);
  launch.kernel("merge_splits_kernel", &merge_splits_kernel<A, TO, TL>,
                dim3(static_cast<unsigned>(merge_blocks)), 32 * merge_warps, merge_splits_smem<A>, ws_o,
                ws_o + pl.ws_out_elems, pl.splits, a.batch, a.q_heads, a.q_len, a.value_dim,
                static_cast<TO*>(a.out), a.os[0], a.os[1], a.os[2], a.os[3], static_cast<TL*>(a.lse), a.ls[0],
                a.ls[1], a.ls[2]);
}

// Accumulation type of merge_attention_states: double if anything involved is double.
template <class TI, class TLI, class TO, class TL>
using merge_acc_t = std::conditional_t<std::is_same_v<TI, double> || std::is_same_v<TLI, double> ||
                                           std::is_same_v<TO, double> || std::is_same_v<TL, double>,
                                       double, float>;

// The checks of merge_attention_states: o_b and o shaped like o_a (batch, seq, head, dim); lse_a,
// lse_b and the optional lse (batch, head, seq) to match.
template <class TA, class TLA, class TB, class TLB, class TO, class TL>
void validate_merge(std::string_view fn, const tensor_view<TA, 4>& o_a, const tensor_view<TLA, 3>& lse_a,
                    const tensor_view<TB, 4>& o_b, const tensor_view<TLB, 3>& lse_b,
                    const tensor_view<TO, 4>& o, const tensor_view<TL, 3>& lse) {
  static_assert(std::is_same_v<std::remove_const_t<TA>, std::remove_const_t<TB>> &&
                    std::is_same_v<std::remove_const_t<TLA>, std::remove_const_t<TLB>>,
                "o_a/o_b and lse_a/lse_b must have matching element types");
  static_assert(is_output_element_v<std::remove_const_t<TA>> &&
                    is_output_element_v<std::remove_const_t<TLA>> && is_output_element_v<TO> &&
                    is_output_element_v<TL>,
                "merge_attention_states works on float or double results (o and lse non-const)");
  const index_t B = o_a.extent(0), S = o_a.extent(1), H = o_a.extent(2), D = o_a.extent(3);
  const std::array<index_t, 4> o_ext{B, S, H, D};
  const std::array<index_t, 3> l_ext{B, H, S};
  attnkit::detail::require_extents(fn, "o_b", o_b, o_ext, "(batch, seq, head, dim) as o_a");
  attnkit::detail::require_extents(fn, "o", o, o_ext, "(batch, seq, head, dim) as o_a");
  attnkit::detail::require_extents(fn, "lse_a", lse_a, l_ext, "(batch, head, seq) matching o_a");
  attnkit::detail::require_extents(fn, "lse_b", lse_b, l_ext, "(batch, head, seq) matching o_a");
  if (!lse.empty() || lse.data() != nullptr)
    attnkit::detail::require_extents(fn, "lse", lse, l_ext, "(batch, head, seq) matching o_a");
  // Outputs must not broadcast: a stride 0 on an axis of extent > 1 would send several lanes'
  // writes to one element.
  auto writable = [&](std::string_view arg, const auto& view) {
    if (view.empty()) return;
    for (std::size_t ax = 0; ax < view.rank; ++ax)
      if (view.extent(ax) > 1 && view.stride(ax) == 0)
        attnkit::detail::fail(
            fn, arg, attnkit::detail::concat("a non-zero stride on axis ", ax, " (an output)"), "stride 0");
  };
  writable("o", o);
  writable("lse", lse);
}

// The launch of merge_attention_states for validated views.
template <class A, class TI, class TLI, class TO, class TL, class Launcher>
void run_merge_pair(std::string_view fn, const tensor_view<const TI, 4>& o_a,
                    const tensor_view<const TLI, 3>& lse_a, const tensor_view<const TI, 4>& o_b,
                    const tensor_view<const TLI, 3>& lse_b, const tensor_view<TO, 4>& o,
                    const tensor_view<TL, 3>& lse, Launcher& launch) {
  const index_t B = o_a.extent(0), S = o_a.extent(1), H = o_a.extent(2), D = o_a.extent(3);
  const index_t rows = B * H * S;
  if (rows == 0) return;
  const index_t blocks = ceil_div(rows, merge_warps);
  attnkit::detail::require(blocks <= INT_MAX, fn, "o_a", "at most 2^31 - 1 merge blocks", blocks);
  const rows_view<const TI> va{o_a.data(), {o_a.stride(0), o_a.stride(1), o_a.stride(2), o_a.stride(3)}};
  const rows_view<const TI> vb{o_b.data(), {o_b.stride(0), o_b.stride(1), o_b.stride(2), o_b.stride(3)}};
  const rows_view<TO> vo{o.data(), {o.stride(0), o.stride(1), o.stride(2), o.stride(3)}};
  TL* const lse_out = lse.empty() ? nullptr : lse.data();
  launch.kernel("merge_pair_kernel", &merge_pair_kernel<A, TI, TLI, TO, TL>,
                dim3(static_cast<unsigned>(blocks)), 32 * merge_warps, std::size_t(0), va, lse_a.data(),
                lse_a.stride(0), lse_a.stride(1), lse_a.stride(2), vb, lse_b.data(), lse_b.stride(0),
                lse_b.stride(1), lse_b.stride(2), vo, lse_out, lse.stride(0), lse.stride(1), lse.stride(2), B,
                H, S, D);
}

template <class T, class TO, class TL, class Launcher>
void dispatch_flash(std::string_view fn, const flash_args& a, Launcher& launch, bool can_split) {
  const index_t widest = a.head_dim > a.value_dim ? a.head_dim : a.value_dim;
  dispatch_head_dim(fn, widest, [&](auto head_dim) {
    run_flash<flash_config<T, decltype(head_dim)::value>, TO, TL>(fn, a, launch, can_split);
  });
}

}  // namespace attnkit::cuda::detail
