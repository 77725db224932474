// attnkit::cuda::flash_attention and merge_attention_states with float inputs (FMA path) against
// reference_attention, on the GPU: every case list of flash_cases.hpp at full size; and
// block_sparse_attention (the flash kernel's Sparse instantiation) on the case lists of
// block_sparse_cases.hpp. Block-sparse runs for bf16 and float only (the tensor-core and FMA paths;
// f16 and double differ from them only in the mma variant / precision), to keep the CI build short.
#include "cuda_backend.cuh"  // first: the attnkit/cuda headers, then the cases
#include "block_sparse_cases.hpp"

TEST_CASE("cuda flash float vs reference", "[cuda][float]") {
  attnkit::test::cuda_cases::gpu_backend backend;
  attnkit::test::cuda_cases::run_flash_suite<float>(backend, false);
}

TEST_CASE("cuda block-sparse float vs reference", "[cuda][block_sparse][float]") {
  attnkit::test::cuda_cases::gpu_backend backend;
  attnkit::test::cuda_cases::run_block_sparse_suite<float>(backend, false);
}

TEST_CASE("cuda block-sparse float with a full mask equals flash_attention bitwise", "[cuda][block_sparse][float]") {
  attnkit::test::cuda_cases::gpu_backend backend;
  attnkit::test::cuda_cases::check_full_mask_equals_flash<float>(backend);
}

TEST_CASE("cuda block-sparse validates the mask like the CPU operator", "[cuda][block_sparse][errors]") {
  attnkit::test::cuda_cases::gpu_backend backend;
  attnkit::test::cuda_cases::check_block_sparse_errors(backend);
}
