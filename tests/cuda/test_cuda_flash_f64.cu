// attnkit::cuda::flash_attention and merge_attention_states with double inputs (FMA path) against
// reference_attention, on the GPU: every case list of flash_cases.hpp at full size.
#include "cuda_backend.cuh"

TEST_CASE("cuda flash double vs reference", "[cuda][double]") {
  attnkit::test::cuda_cases::gpu_backend backend;
  attnkit::test::cuda_cases::run_flash_suite<double>(backend, false);
}
