// attnkit::cuda::block_sparse_attention's kernel (the flash kernel walking a block mask's key-tile
// runs) on the CPU through the instruction emulation (see test_cuda_emulated.cpp), against
// reference_attention with the mask as a -inf bias: the case lists of block_sparse_cases.hpp at
// smaller sizes, through the same preparation and launch (block_sparse_plan.cuh).
#define ATTNKIT_CUDA_EMULATION "emulation/warp_emulator.hpp"
#include <attnkit/cuda/block_sparse_plan.cuh>

#include "block_sparse_cases.hpp"
#include "emulation/emulated_launcher.hpp"

using namespace attnkit;
using namespace attnkit::test::cuda_cases;
using test::tensor3;
using test::tensor4;

namespace {

struct emulated_block_sparse_backend {
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

  template <class T, class TO>
  void block_sparse(const problem<T>& p, const block_mask& mask, tensor4<TO>& out, tensor3<TO>* lse) {
    constexpr std::string_view fn = "cuda::block_sparse_attention";
    const tensor_view<TO, 3> lse_view = lse ? lse->view : tensor_view<TO, 3>{};
    const cuda::detail::flash_args a = cuda::detail::prepare_block_sparse(fn, p.q.cview(), p.k.cview(), p.v.cview(),
                                                                          out.view, mask, p.params, lse_view);
    if (a.rows == 0) return;
    emulated_launcher launch;
    cuda::detail::dispatch_block_sparse<T, TO, TO>(fn, a, mask, launch);
  }
};

}  // namespace

TEST_CASE("emulated CUDA block-sparse, bf16 (tensor-core path)", "[cuda][emulated][block_sparse]") {
  emulated_block_sparse_backend be;
  run_block_sparse_suite<bf16>(be, true);
}

TEST_CASE("emulated CUDA block-sparse, float (FMA path)", "[cuda][emulated][block_sparse]") {
  emulated_block_sparse_backend be;
  run_block_sparse_suite<float>(be, true);
}

TEST_CASE("emulated CUDA block-sparse: a full mask equals flash bitwise, mask checks",
          "[cuda][emulated][block_sparse]") {
  emulated_block_sparse_backend be;
  check_full_mask_equals_flash<bf16>(be);
  check_full_mask_equals_flash<float>(be);
  check_block_sparse_errors(be);
}
