// attnkit::cuda::linear_attention against reference_linear_attention on the GPU: the case lists of
// linear_cases.hpp at full size, float, double and bf16/f16 inputs, NaN containment, argument
// checks, and bitwise reproducibility on a user stream.
#include "cuda_backend.cuh"
#include "linear_cases.hpp"

using namespace attnkit;
using namespace attnkit::test::cuda_cases;
using test::tensor4;

TEST_CASE("cuda linear float vs reference", "[cuda][linear][float]") {
  gpu_backend be;
  run_linear_suite<float>(be, false);
}

TEST_CASE("cuda linear double vs reference", "[cuda][linear][double]") {
  gpu_backend be;
  run_linear_suite<double>(be, false);
}

TEST_CASE("cuda linear bf16 and f16 inputs vs reference on the rounded values", "[cuda][linear][bf16]") {
  gpu_backend be;
  for (const linear_spec& s : linear_shape_specs(false)) {
    check_linear<bf16>(be, s);
    check_linear<f16>(be, s);
  }
}

TEST_CASE("cuda linear: NaN containment and argument checks", "[cuda][linear][errors]") {
  gpu_backend be;
  check_linear_nan_containment(be);
  check_linear_errors(be);
}

TEST_CASE("cuda linear: bitwise reproducible on the default and a user stream", "[cuda][linear][determinism]") {
  linear_spec s;
  s.B = 2, s.Nq = s.Nk = 1000, s.Hq = 4, s.Hkv = 2, s.D = 64, s.causal = true, s.decay = true;
  s.phi = feature_map::favor_positive;
  const linear_problem<float> pr = make_linear_problem<float>(s);
  gpu_backend be;
  tensor4<float> a(s.B, s.Nq, s.Hq, s.D), b(s.B, s.Nq, s.Hq, s.D);
  be.linear<float, float>(pr.q, pr.k, pr.v, a, pr.p);
  cudaStream_t stream = nullptr;
  cuda_require(cudaStreamCreate(&stream), "cudaStreamCreate");
  be.stream = stream;
  be.linear<float, float>(pr.q, pr.k, pr.v, b, pr.p);
  cuda_require(cudaStreamDestroy(stream), "cudaStreamDestroy");
  CHECK(std::memcmp(a.buf.data(), b.buf.data(), a.buf.size() * sizeof(float)) == 0);
}

TEST_CASE("cuda linear: host pointers are rejected unless the device reads pageable memory", "[cuda][linear][errors]") {
  int dev = 0, pageable = 0;
  cuda_require(cudaGetDevice(&dev), "cudaGetDevice");
  cuda_require(cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, dev), "cudaDeviceGetAttribute");
  if (pageable != 0) {
    WARN("this device reads pageable host memory: host pointers are legal here, nothing to check");
    return;
  }
  linear_spec s;
  s.B = 1, s.Nq = s.Nk = 4, s.Hq = 1, s.Hkv = 1, s.D = 8;
  const linear_problem<float> pr = make_linear_problem<float>(s);
  device_view<float, 4> dk(pr.k.buf, pr.k.view), dv(pr.v.buf, pr.v.view);
  tensor4<float> out(1, 4, 1, 8);
  device_view<float, 4> dout(out.buf, out.view);
  test::require_error(
      [&] {
        cuda::linear_attention(pr.q.cview(), tensor_view<const float, 4>(dk.view), tensor_view<const float, 4>(dv.view),
                               dout.view, pr.p);
      },
      {"cuda::linear_attention", "q", "plain host memory"});
}
