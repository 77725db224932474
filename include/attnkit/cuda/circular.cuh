// attnkit::cuda::circular_attention: circular-convolutional attention (CAT) with the CPU operator's
// semantics (ops/circular.hpp: non-causal circular convolution, causal truncated convolution,
// causal + renormalize, non-finite logits and values) on NVIDIA GPUs of compute capability 8.0 or
// newer, the transforms by cuFFT. Include from a .cu file compiled by nvcc (-std=c++20) and link
// attnkit::cuda (which links CUDA::cufft). How it computes: circular_kernel.cuh.
//
// Memory. logits, v and out point to memory the current device can read or write. Work is queued on
// `stream`; transform buffers come from the stream-ordered pool (passes over groups of heads of at
// most 256 MiB each: per head, dim + 1 rows of 2 (M / 2 + 1) floats, M < 4N the transform length).
// cuFFT plans are made for each call and released before it returns, which waits for the call's
// work on `stream` (cufftDestroy frees device memory).
//
// Errors: see launch.cuh. Bad shapes throw attnkit::error with the CPU operator's checks and
// messages (function name "cuda::circular_attention") before anything is launched; so do host
// pointers, GPUs older than sm_80 and sequences above 16777216. cuFFT failures throw
// attnkit::error naming the cufft call and its cufftResult.
//
// Precision as on the CPU: the transform in float (any input type), expect max-abs errors around
// 1e-6 of max |v|; causal + renormalize sums the rows whose prefix holds less than 1/8 of the weight
// mass directly in double.
#pragma once

#include <cufft.h>

#include <memory>
#include <string>
#include <vector>

#include "attnkit/cuda/launch.cuh"  // first: includes the core headers the way nvcc wants them
#include "attnkit/cuda/circular_plan.cuh"

namespace attnkit::cuda {

namespace detail {

inline void check_cufft(cufftResult r, std::string_view fn, std::string_view step) {
  if (r != CUFFT_SUCCESS)
    throw attnkit::error(attnkit::detail::concat(fn, ": ", step, ": cuFFT error ", static_cast<int>(r)));
}

// stream_launcher plus in-place batched cuFFT transforms on the same stream. Plans are kept until
// the launcher is destroyed (after the last transform has been queued).
struct cufft_launcher : stream_launcher {
  struct plan {
    cufftHandle h = 0;
    plan() = default;
    plan(const plan&) = delete;
    plan& operator=(const plan&) = delete;
    ~plan() {
      if (h != 0) (void)cufftDestroy(h);
    }
  };
  std::vector<std::unique_ptr<plan>> plans;  // keyed by (M, count, direction) below
  std::vector<long long> keys;

  void fft(float* rows, index_t M, index_t row, index_t count, bool forward) {
    const long long key = (static_cast<long long>(count) * 2 + (forward ? 1 : 0)) * (1ll << 32) + M;
    cufftHandle h = 0;
    for (std::size_t i = 0; i < keys.size(); ++i)
      if (keys[i] == key) h = plans[i]->h;
    if (h == 0) {
      auto p = std::make_unique<plan>();
      check_cufft(cufftCreate(&p->h), fn, "cufftCreate");
      long long n[1] = {M}, real_embed[1] = {row}, complex_embed[1] = {row / 2};
      std::size_t work = 0;
      check_cufft(cufftMakePlanMany64(p->h, 1, n, forward ? real_embed : complex_embed, 1,
                                      forward ? row : row / 2, forward ? complex_embed : real_embed, 1,
                                      forward ? row / 2 : row, forward ? CUFFT_R2C : CUFFT_C2R, count, &work),
                  fn, "cufftMakePlanMany64");
      check_cufft(cufftSetStream(p->h, stream), fn, "cufftSetStream");
      h = p->h;
      plans.push_back(std::move(p));
      keys.push_back(key);
    }
    if (forward)
      check_cufft(cufftExecR2C(h, rows, reinterpret_cast<cufftComplex*>(rows)), fn, "cufftExecR2C");
    else
      check_cufft(cufftExecC2R(h, reinterpret_cast<cufftComplex*>(rows), rows), fn, "cufftExecC2R");
  }
};

}  // namespace detail

// out[b, i, h, :] = CAT of logits[b, h, :] and v exactly as attnkit::circular_attention defines it
// (see ops/circular.hpp), queued on `stream`. out must not overlap logits or v.
template <class TL, class TV, class TO>
void circular_attention(tensor_view<TL, 3> logits, tensor_view<TV, 4> v, tensor_view<TO, 4> out,
                        const circular_params& params = {}, cudaStream_t stream = nullptr) {
  constexpr std::string_view fn = "cuda::circular_attention";
  const detail::circular_args a = detail::prepare_circular(fn, logits, v, out, params);
  if (detail::circular_empty(a)) return;

  const detail::device_info dev = detail::current_device(fn);
  detail::require_sm80(fn, dev);
  detail::require_device_view(fn, "logits", logits, dev);
  detail::require_device_view(fn, "v", v, dev);
  detail::require_device_view(fn, "out", out, dev);

  // The workspace (inside run_circular) is released before the plans (declared first).
  detail::cufft_launcher launch{{fn, dev, stream}, {}, {}};
  detail::run_circular<std::remove_const_t<TL>, std::remove_const_t<TV>, TO>(fn, a, launch);
}

}  // namespace attnkit::cuda
