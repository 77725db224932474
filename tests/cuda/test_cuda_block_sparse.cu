// attnkit::cuda::block_sparse_attention against reference_attention with the mask as a -inf bias,
// on the GPU: random and geometric masks, every attention_params field, head-dim buckets, bf16 and
// float (tensor-core and FMA paths); a full mask equals flash_attention bitwise; mask checks.
#include "block_sparse_cases.hpp"
#include "cuda_backend.cuh"

using namespace attnkit;
using namespace attnkit::test::cuda_cases;

TEST_CASE("cuda block-sparse bf16 vs reference", "[cuda][block_sparse][bf16]") {
  gpu_backend be;
  run_block_sparse_suite<bf16>(be, false);
}

TEST_CASE("cuda block-sparse f16 vs reference", "[cuda][block_sparse][f16]") {
  gpu_backend be;
  run_block_sparse_suite<f16>(be, false);
}

TEST_CASE("cuda block-sparse float vs reference", "[cuda][block_sparse][float]") {
  gpu_backend be;
  run_block_sparse_suite<float>(be, false);
}

TEST_CASE("cuda block-sparse double vs reference", "[cuda][block_sparse][double]") {
  gpu_backend be;
  run_block_sparse_suite<double>(be, false);
}

TEST_CASE("cuda block-sparse with a full mask equals flash_attention bitwise", "[cuda][block_sparse]") {
  gpu_backend be;
  check_full_mask_equals_flash<bf16>(be);
  check_full_mask_equals_flash<float>(be);
}

TEST_CASE("cuda block-sparse validates the mask like the CPU operator", "[cuda][block_sparse][errors]") {
  gpu_backend be;
  check_block_sparse_errors(be);
}
