// Host-side preparation and sequencing of cuda::circular_attention, free of CUDA runtime calls:
// the CPU operator's checks, the transform length, the passes over groups of heads and the order of
// kernels and transforms (circular_kernel.cuh). The Launcher (see flash_plan.cuh) must also provide
//   void fft(float* rows, index_t M, index_t row, index_t count, bool forward);
// in-place batched real transforms of `count` rows of `row` = 2 (M / 2 + 1) floats, unnormalized,
// as cuFFT's R2C (forward: M reals -> M / 2 + 1 complex) and C2R (inverse) compute them.
// circular.cuh passes one built on cuFFT; the CPU emulation test one with a plain DFT.
#pragma once

#include <climits>
#include <cstddef>
#include <string_view>

#include <vector_types.h>  // dim3

#include "attnkit/cuda/circular_kernel.cuh"
#include "attnkit/cuda/core.cuh"
#include "attnkit/cuda/cpu_ops.cuh"

namespace attnkit::cuda::detail {

// Transform buffers of one pass stay within this (at least one head per pass).
inline constexpr std::size_t circular_pass_bytes = std::size_t(256) << 20;

// Validates with the CPU operator's checks and messages and fills the pass-independent arguments.
// heads == 0 (or seq, dim == 0) means there is nothing to compute.
template <class TL, class TV, class TO>
circular_args prepare_circular(std::string_view fn, const tensor_view<TL, 3>& logits, const tensor_view<TV, 4>& v,
                               const tensor_view<TO, 4>& out, const circular_params& p) {
  attnkit::detail::check_circular_types<TL, TV, TO>();
  const attnkit::detail::circular_shape s = attnkit::detail::validate_circular(fn, logits, v, out);
  circular_args a;
  a.logits = logits.data();
  for (std::size_t ax = 0; ax < 3; ++ax) a.ls[ax] = logits.stride(ax);
  a.v = v.data();
  a.out = out.data();
  for (std::size_t ax = 0; ax < 4; ++ax) a.vs[ax] = v.stride(ax), a.os[ax] = out.stride(ax);
  a.heads = s.batch * s.heads == 0 ? 0 : s.heads;
  a.pass_heads = s.batch * s.heads;  // total until run_circular cuts passes
  a.seq = s.seq, a.dim = s.dim;
  a.causal = p.causal;
  a.renorm = p.causal && p.renormalize;
  // As on the CPU: the length-N cyclic transform when it is exact (non-causal, N = 2^a 3^b 5^c),
  // else a length >= 2N - 1 that turns the cyclic convolution into the linear one.
  const bool direct_cyclic = !p.causal && kernels::fft_is_good_size(s.seq);
  a.M = direct_cyclic ? s.seq : kernels::fft_good_size(2 * s.seq - 1);
  a.row = 2 * (a.M / 2 + 1);
  a.fold = !p.causal && !direct_cyclic ? s.seq : 0;
  return a;
}

inline bool circular_empty(const circular_args& a) { return a.heads == 0 || a.seq == 0 || a.dim == 0; }

template <class TL, class TV, class TO, class Launcher>
void run_circular(std::string_view fn, circular_args a, Launcher& launch) {
  const index_t total = a.pass_heads, N = a.seq, D = a.dim, ctiles = (D + 31) / 32;
  const std::size_t per_head = static_cast<std::size_t>((D + 1) * a.row + (a.renorm ? N : 0)) * sizeof(float) +
                               sizeof(circular_head) + static_cast<std::size_t>(D) * sizeof(unsigned long long);
  index_t heads = static_cast<index_t>(circular_pass_bytes / per_head);
  if (heads < 1) heads = 1;
  if (heads > total) heads = total;
  if (heads * ctiles > 65535) heads = 65535 / ctiles;  // grid y of the pack / unpack kernels
  // Grid limits: rows of the direct kernel and position tiles in x (2^31 - 1), frequency blocks of
  // the multiply kernel in y (65535).
  const index_t freq_blocks = (a.M / 2 + 1 + circular_threads - 1) / circular_threads;
  attnkit::detail::require(N <= INT_MAX && freq_blocks <= 65535, fn, "logits",
                           "a sequence length whose transform the kernels' grids cover (at most 16777216)", N);
  // Workspace: values, filters, factors (float), then head info and first-bad positions (8-byte).
  const index_t vals = heads * D * a.row, filt = heads * a.row, fac = a.renorm ? heads * N : 0;
  const std::size_t float_bytes = static_cast<std::size_t>(vals + filt + fac) * sizeof(float);
  const std::size_t info_off = (float_bytes + 15) / 16 * 16;
  const std::size_t bad_off = info_off + static_cast<std::size_t>(heads) * sizeof(circular_head);
  auto ws = launch.workspace(bad_off + static_cast<std::size_t>(heads * D) * sizeof(unsigned long long));
  unsigned char* base = static_cast<unsigned char*>(ws.ptr);
  a.values = reinterpret_cast<float*>(base);
  a.filters = a.values + vals;
  a.factors = a.renorm ? a.filters + filt : nullptr;
  a.info = reinterpret_cast<circular_head*>(base + info_off);
  a.first_bad = reinterpret_cast<unsigned long long*>(base + bad_off);

  const auto tiles = [](index_t n) { return static_cast<unsigned>((n + 31) / 32); };
  for (index_t h0 = 0; h0 < total; h0 += heads) {
    a.head0 = h0;
    a.pass_heads = total - h0 < heads ? total - h0 : heads;
    const auto ph = static_cast<unsigned>(a.pass_heads), py = static_cast<unsigned>(a.pass_heads * ctiles);
    launch.kernel("circular_softmax_kernel", &circular_softmax_kernel<TL>, dim3(ph), circular_threads,
                  circular_threads * sizeof(double), a);
    launch.kernel("circular_pack_kernel", &circular_pack_kernel<TV>, dim3(tiles(a.row), py), circular_threads,
                  circular_tile_smem, a);
    launch.fft(a.filters, a.M, a.row, a.pass_heads, true);
    launch.fft(a.values, a.M, a.row, a.pass_heads * D, true);
    launch.kernel("circular_multiply_kernel", &circular_multiply_kernel,
                  dim3(static_cast<unsigned>(a.pass_heads * D), static_cast<unsigned>(freq_blocks)), circular_threads,
                  std::size_t(0), a);
    launch.fft(a.values, a.M, a.row, a.pass_heads * D, false);
    launch.kernel("circular_unpack_kernel", &circular_unpack_kernel<TO>, dim3(tiles(N), py), circular_threads,
                  circular_tile_smem, a);
    if (a.renorm)
      launch.kernel("circular_direct_kernel", &circular_direct_kernel<TL, TV, TO>,
                    dim3(static_cast<unsigned>(N), ph), circular_threads, circular_threads * sizeof(double), a);
  }
}

}  // namespace attnkit::cuda::detail
