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
