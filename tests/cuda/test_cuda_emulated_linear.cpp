// attnkit::cuda::linear_attention's kernels run on the CPU through the instruction emulation (see
// test_cuda_emulated.cpp) against reference_linear_attention: the case lists of linear_cases.hpp at
// smaller sizes, through the same host-side preparation and launch sequence (linear_plan.cuh).
#define ATTNKIT_CUDA_EMULATION "emulation/warp_emulator.hpp"
#include <attnkit/cuda/linear_plan.cuh>

#include "emulation/emulated_launcher.hpp"
#include "linear_cases.hpp"

using namespace attnkit;
using namespace attnkit::test::cuda_cases;
using test::tensor4;

namespace {

struct emulated_linear_backend {
  template <class T, class TO>
  void linear(const tensor4<T>& q, const tensor4<T>& k, const tensor4<T>& v, tensor4<TO>& out,
              const linear_params& p) {
    constexpr std::string_view fn = "cuda::linear_attention";
    using Acc = attnkit::detail::linear_accum_t<T, T, T>;
    auto c = cuda::detail::prepare_linear<Acc>(fn, q.cview(), k.cview(), v.cview(), out.view, p);
    if (c.empty()) return;
    emulated_launcher launch;
    cuda::detail::run_linear<Acc, T, T, T, TO>(fn, std::move(c), launch);
  }
};

}  // namespace

TEST_CASE("emulated CUDA linear attention, float", "[cuda][emulated][linear]") {
  emulated_linear_backend be;
  run_linear_suite<float>(be, true);
}

TEST_CASE("emulated CUDA linear attention, double", "[cuda][emulated][linear]") {
  emulated_linear_backend be;
  run_linear_suite<double>(be, true);
}

TEST_CASE("emulated CUDA linear attention, bf16 and f16 inputs", "[cuda][emulated][linear]") {
  emulated_linear_backend be;
  for (const linear_spec& s : linear_shape_specs(true)) {
    check_linear<bf16>(be, s);
    check_linear<f16>(be, s);
  }
}

TEST_CASE("emulated CUDA linear attention: NaN containment and argument checks", "[cuda][emulated][linear]") {
  emulated_linear_backend be;
  check_linear_nan_containment(be);
  check_linear_errors(be);
}
