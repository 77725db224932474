// attnkit's CUDA kernels run on the CPU through the instruction emulation in emulation/, against
// reference_attention: the same case lists as the GPU tests, at smaller sizes. This is the part of
// the CUDA backend's verification that runs without a GPU (in CI); it checks the kernels' index
// arithmetic, mma/ldmatrix fragment layouts, tails, masks, the split-KV plan and both merges, but
// not the real hardware (timing-dependent races, the actual instructions, performance).
#define ATTNKIT_CUDA_EMULATION "emulation/warp_emulator.hpp"
#include <attnkit/cuda/flash_plan.cuh>

#include "emulation/emulated_launcher.hpp"
#include "flash_cases.hpp"

using namespace attnkit;
using namespace attnkit::test::cuda_cases;
using test::tensor3;
using test::tensor4;

namespace {

// The emulated counterpart of attnkit::cuda::flash_attention / merge_attention_states: the same
// host-side preparation and launch sequence (flash_plan.cuh), host memory standing in for device
// memory. Splitting is always allowed, as on GPUs with memory pools.
struct emulated_backend {
  template <class T, class TO>
  void flash(const problem<T>& p, tensor4<TO>& out, tensor3<TO>* lse) {
    constexpr std::string_view fn = "cuda::flash_attention";
    const tensor_view<TO, 3> lse_view = lse ? lse->view : tensor_view<TO, 3>{};
    const cuda::detail::flash_args a =
        cuda::detail::prepare_flash(fn, p.q.cview(), p.k.cview(), p.v.cview(), out.view, p.params, lse_view);
    if (a.rows == 0) return;
    emulated_launcher launch;
    cuda::detail::dispatch_flash<T, TO, TO>(fn, a, launch, true);
  }

  template <class TO>
  void merge(const tensor4<TO>& oa, const tensor3<TO>& la, const tensor4<TO>& ob, const tensor3<TO>& lb,
             tensor4<TO>& o, tensor3<TO>* l, bool /*in_place: host memory aliases by itself*/) {
    constexpr std::string_view fn = "cuda::merge_attention_states";
    const tensor_view<TO, 3> lv = l ? l->view : tensor_view<TO, 3>{};
    cuda::detail::validate_merge(fn, oa.cview(), tensor_view<const TO, 3>(la.view), ob.cview(),
                                 tensor_view<const TO, 3>(lb.view), o.view, lv);
    emulated_launcher launch;
    cuda::detail::run_merge_pair<TO, TO, TO, TO, TO>(fn, oa.cview(), tensor_view<const TO, 3>(la.view),
                                                     ob.cview(), tensor_view<const TO, 3>(lb.view), o.view,
                                                     lv, launch);
  }
};

}  // namespace

TEST_CASE("emulated CUDA flash, bf16 (tensor-core path)", "[cuda][emulated][bf16]") {
  emulated_backend be;
  run_flash_suite<bf16>(be, true);
}

TEST_CASE("emulated CUDA flash, f16 (tensor-core path)", "[cuda][emulated][f16]") {
  emulated_backend be;
  run_flash_suite<f16>(be, true);
}

TEST_CASE("emulated CUDA flash, float (FMA path)", "[cuda][emulated][float]") {
  emulated_backend be;
  run_flash_suite<float>(be, true);
}

TEST_CASE("emulated CUDA flash, double (FMA path)", "[cuda][emulated][double]") {
  emulated_backend be;
  run_flash_suite<double>(be, true);
}

TEST_CASE("emulated CUDA merge with empty sides is exact", "[cuda][emulated][merge]") {
  emulated_backend be;
  check_merge_empty_sides(be);
}

TEST_CASE("emulated CUDA flash validates like the CPU operators", "[cuda][emulated][errors]") {
  emulated_backend be;
  problem<float> p = make_problem<float>(spec{});
  tensor4<float> bad(1, 2, 1, 64);  // out with the wrong seq extent
  test::require_error([&] { be.flash<float, float>(p, bad, nullptr); }, {"cuda::flash_attention", "out"});
  spec wide;
  wide.D = 300;
  problem<float> pw = make_problem<float>(wide);
  tensor4<float> out(1, 1, 1, 300);
  test::require_error([&] { be.flash<float, float>(pw, out, nullptr); },
                      {"cuda::flash_attention", "head_dim and value_dim <= 256", "300"});
}
