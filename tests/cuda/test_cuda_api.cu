// attnkit::cuda's contract beyond the numbers: errors are attnkit::error thrown before anything is
// written, host pointers are rejected, empty problems, determinism, user streams, exact merges with
// empty sides.
#include "cuda_backend.cuh"

using namespace attnkit;
using namespace attnkit::test::cuda_cases;
using test::tensor3;
using test::tensor4;

namespace {

bool device_reads_pageable_memory() {
  int dev = 0, v = 0;
  cuda_require(cudaGetDevice(&dev), "cudaGetDevice");
  cuda_require(cudaDeviceGetAttribute(&v, cudaDevAttrPageableMemoryAccess, dev), "cudaDeviceGetAttribute");
  return v != 0;
}

template <class T>
bool all_nan(const std::vector<T>& v) {
  return std::all_of(v.begin(), v.end(), [](T x) { return std::isnan(static_cast<double>(x)); });
}

}  // namespace

TEST_CASE("invalid arguments throw attnkit::error before anything is written", "[cuda][errors]") {
  const problem<float> p = make_problem<float>(spec{});  // B1 Nq1 Nk1 H1 D64
  device_view<const float, 4> q(p.q.buf, p.q.cview()), k(p.k.buf, p.k.cview()), v(p.v.buf, p.v.cview());
  tensor4<float> out_h(1, 1, 1, 64), bad_h(1, 2, 1, 64);
  device_view<float, 4> out(out_h.buf, out_h.view), bad(bad_h.buf, bad_h.view);
  tensor_view<const float, 4> cq = q.view, ck = k.view, cv = v.view;

  test::require_error([&] { cuda::flash_attention(cq, ck, cv, bad.view); }, {"cuda::flash_attention", "out"});
  attention_params neg;
  neg.window_left = -3;
  test::require_error([&] { cuda::flash_attention(cq, ck, cv, out.view, neg); },
                      {"cuda::flash_attention", "params.window_left"});
  attention_params cap;
  cap.softcap = -1.f;
  test::require_error([&] { cuda::flash_attention(cq, ck, cv, out.view, cap); }, {"params.softcap"});
  cuda::synchronize();
  out.download(out_h.buf);
  CHECK(all_nan(out_h.buf));

  // Head dim above the largest tile.
  tensor4<float> wq(1, 1, 1, 300), wo(1, 1, 1, 300);
  device_view<float, 4> dwq(wq.buf, wq.view), dwo(wo.buf, wo.view);
  tensor_view<const float, 4> cwq = dwq.view;
  test::require_error([&] { cuda::flash_attention(cwq, cwq, cwq, dwo.view); },
                      {"cuda::flash_attention", "head_dim and value_dim <= 256", "300"});
}

TEST_CASE("host pointers are rejected unless the device reads pageable memory", "[cuda][errors]") {
  if (device_reads_pageable_memory()) {
    WARN("this device reads pageable host memory: host pointers are legal here, nothing to check");
    return;
  }
  const problem<float> p = make_problem<float>(spec{});
  device_view<const float, 4> k(p.k.buf, p.k.cview()), v(p.v.buf, p.v.cview());
  tensor4<float> out_h(1, 1, 1, 64);
  device_view<float, 4> out(out_h.buf, out_h.view);
  test::require_error(
      [&] {
        cuda::flash_attention(p.q.cview(), tensor_view<const float, 4>(k.view),
                              tensor_view<const float, 4>(v.view), out.view);
      },
      {"cuda::flash_attention", "q", "plain host memory"});
  device_view<const float, 4> q(p.q.buf, p.q.cview());
  const float slope = 0.5f;
  attention_params host_slopes;
  host_slopes.alibi_slopes = &slope;
  test::require_error(
      [&] {
        cuda::flash_attention(tensor_view<const float, 4>(q.view), tensor_view<const float, 4>(k.view),
                              tensor_view<const float, 4>(v.view), out.view, host_slopes);
      },
      {"params.alibi_slopes"});
  cuda::synchronize();
  out.download(out_h.buf);
  CHECK(all_nan(out_h.buf));
}

TEST_CASE("no keys: out 0 and lse -inf; no queries: nothing happens", "[cuda][empty]") {
  gpu_backend be;
  spec s;
  s.B = 2, s.Nq = 5, s.Nk = 0, s.Hq = 2, s.Hkv = 1, s.D = 64;
  check_flash<float>(be, s);
  s.Nq = 0, s.Nk = 10;
  check_flash<float>(be, s);
}

TEST_CASE("results are bitwise reproducible, on the default and on a user stream", "[cuda][determinism]") {
  spec s;
  s.B = 2, s.Nq = 1, s.Nk = 20000, s.Hq = 8, s.Hkv = 2, s.D = 128, s.causal = true;  // split-KV path
  s.kv_lengths = {20000, 777};
  const problem<float> p = make_problem<float>(s);
  gpu_backend be;
  tensor4<float> a(s.B, s.Nq, s.Hq, s.D), b(s.B, s.Nq, s.Hq, s.D);
  tensor3<float> la(s.B, s.Hq, s.Nq), lb(s.B, s.Hq, s.Nq);
  be.flash<float, float>(p, a, &la);
  cudaStream_t stream = nullptr;
  cuda_require(cudaStreamCreate(&stream), "cudaStreamCreate");
  be.stream = stream;
  be.flash<float, float>(p, b, &lb);
  cuda_require(cudaStreamDestroy(stream), "cudaStreamDestroy");
  CHECK(std::memcmp(a.buf.data(), b.buf.data(), a.buf.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(la.buf.data(), lb.buf.data(), la.buf.size() * sizeof(float)) == 0);
}

TEST_CASE("merge with an empty side returns the other side exactly", "[cuda][merge]") {
  gpu_backend be;
  check_merge_empty_sides(be);
}
