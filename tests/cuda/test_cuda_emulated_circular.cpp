// attnkit::cuda::circular_attention's kernels on the CPU through the instruction emulation (see
// test_cuda_emulated.cpp), the cuFFT transforms replaced by plain DFTs in double with cuFFT's R2C /
// C2R conventions (emulation/emulated_launcher.hpp), against reference_circular_attention: the case
// lists of circular_cases.hpp at smaller sizes, through the same preparation and launch sequence
// (circular_plan.cuh). What this does not check: cuFFT itself and its plan layout parameters.
#define ATTNKIT_CUDA_EMULATION "emulation/warp_emulator.hpp"
#include <attnkit/cuda/circular_plan.cuh>

#include "circular_cases.hpp"
#include "emulation/emulated_launcher.hpp"

using namespace attnkit;
using namespace attnkit::test::cuda_cases;
using test::tensor3;
using test::tensor4;

namespace {

struct emulated_circular_backend {
  template <class TL, class TV, class TO>
  void circular(const tensor3<TL>& l, const tensor4<TV>& v, tensor4<TO>& out, const circular_params& p) {
    constexpr std::string_view fn = "cuda::circular_attention";
    const auto a = cuda::detail::prepare_circular(fn, tensor_view<const TL, 3>(l.view), v.cview(), out.view, p);
    if (cuda::detail::circular_empty(a)) return;
    emulated_launcher launch;
    cuda::detail::run_circular<TL, TV, TO>(fn, a, launch);
  }
};

// The emulated launcher's DFTs against a direct evaluation of the convolution theorem: a cyclic
// convolution through R2C, a pointwise product and C2R is M times the cyclic convolution.
TEST_CASE("the emulated transforms follow cuFFT's R2C / C2R conventions", "[cuda][emulated][circular]") {
  for (index_t M : {index_t(1), index_t(6), index_t(7)}) {
    const index_t row = 2 * (M / 2 + 1);
    std::vector<float> a(static_cast<std::size_t>(row)), b(static_cast<std::size_t>(row)), want(std::size_t(M), 0.f);
    for (index_t t = 0; t < M; ++t) a[std::size_t(t)] = float(t + 1), b[std::size_t(t)] = float(t % 3) - 0.5f;
    for (index_t i = 0; i < M; ++i)
      for (index_t j = 0; j < M; ++j) want[std::size_t(i)] += a[std::size_t(j)] * b[std::size_t((i - j + M) % M)];
    emulated_launcher launch;
    launch.fft(a.data(), M, row, 1, true);
    launch.fft(b.data(), M, row, 1, true);
    for (index_t k = 0; k <= M / 2; ++k) {
      const float ar = a[std::size_t(2 * k)], ai = a[std::size_t(2 * k + 1)];
      const float br = b[std::size_t(2 * k)], bi = b[std::size_t(2 * k + 1)];
      a[std::size_t(2 * k)] = ar * br - ai * bi;
      a[std::size_t(2 * k + 1)] = ar * bi + ai * br;
    }
    launch.fft(a.data(), M, row, 1, false);
    for (index_t i = 0; i < M; ++i) CHECK(a[std::size_t(i)] == Approx(double(M) * want[std::size_t(i)]).margin(1e-3));
  }
}

}  // namespace

TEST_CASE("emulated CUDA circular attention: lengths and modes", "[cuda][emulated][circular]") {
  emulated_circular_backend be;
  check_circular_lengths(be, true, 2e-6);
}

TEST_CASE("emulated CUDA circular attention: extreme logits, non-finite inputs, layouts, dtypes",
          "[cuda][emulated][circular]") {
  emulated_circular_backend be;
  check_circular_edges(be, true, 2e-6);
}

TEST_CASE("emulated CUDA circular attention: empty extents and argument checks", "[cuda][emulated][circular]") {
  emulated_circular_backend be;
  check_circular_empty_and_errors(be);
}
