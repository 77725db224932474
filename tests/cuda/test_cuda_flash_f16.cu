// attnkit::cuda::flash_attention and merge_attention_states with f16 inputs (tensor-core path) against
// reference_attention, on the GPU: every case list of flash_cases.hpp at full size.
#include "cuda_backend.cuh"

TEST_CASE("cuda flash f16 vs reference", "[cuda][f16]") {
  attnkit::test::cuda_cases::gpu_backend backend;
  attnkit::test::cuda_cases::run_flash_suite<attnkit::f16>(backend, false);
}
