// attnkit::cuda::flash_attention and merge_attention_states with f16 inputs (tensor-core path) against
// reference_attention, on the GPU: every case list of flash_cases.hpp at full size; and
// block_sparse_attention (the same flash kernels, compiled once in this file) on the case lists of
// block_sparse_cases.hpp.
#include "cuda_backend.cuh"  // first: the attnkit/cuda headers, then the cases
#include "block_sparse_cases.hpp"

TEST_CASE("cuda flash f16 vs reference", "[cuda][f16]") {
  attnkit::test::cuda_cases::gpu_backend backend;
  attnkit::test::cuda_cases::run_flash_suite<attnkit::f16>(backend, false);
}

TEST_CASE("cuda block-sparse f16 vs reference", "[cuda][block_sparse][f16]") {
  attnkit::test::cuda_cases::gpu_backend backend;
  attnkit::test::cuda_cases::run_block_sparse_suite<attnkit::f16>(backend, false);
}
