// attnkit::cuda::circular_attention (cuFFT) against reference_circular_attention on the GPU: the
// case lists of circular_cases.hpp at full size. The bound on the maximum absolute error is 5e-6
// (the CPU operator's tests use 2e-6 with their own FFT; cuFFT's float error was not measured: no
// GPU was available when this was written).
#include "circular_cases.hpp"
#include "cuda_backend.cuh"

using namespace attnkit;
using namespace attnkit::test::cuda_cases;

TEST_CASE("cuda circular attention: lengths and modes", "[cuda][circular]") {
  gpu_backend be;
  check_circular_lengths(be, false, 5e-6);
}

TEST_CASE("cuda circular attention: extreme logits, non-finite inputs, layouts, dtypes", "[cuda][circular]") {
  gpu_backend be;
  check_circular_edges(be, false, 5e-6);
}

TEST_CASE("cuda circular attention: empty extents and argument checks", "[cuda][circular][errors]") {
  gpu_backend be;
  check_circular_empty_and_errors(be);
}

TEST_CASE("cuda circular attention: host pointers are rejected unless the device reads pageable memory",
          "[cuda][circular][errors]") {
  int dev = 0, pageable = 0;
  cuda_require(cudaGetDevice(&dev), "cudaGetDevice");
  cuda_require(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, dev), "cudaDeviceGetAttribute");
  if (pageable != 0) {
    WARN("this device reads pageable host memory: host pointers are legal here, nothing to check");
    return;
  }
  test::tensor3<float> l(1, 1, 8, 0.f);
  test::tensor4<float> v(1, 8, 1, 4), out(1, 8, 1, 4);
  test::fill_value(v, 1.f);
  device_view<float, 4> dout(out.buf, out.view);
  test::require_error(
      [&] {
        cuda::circular_attention(tensor_view<const float, 3>(l.view), v.cview(), dout.view);
      },
      {"cuda::circular_attention", "logits", "plain host memory"});
}
