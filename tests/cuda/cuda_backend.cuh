// The GPU backend of the case lists (flash_cases.hpp, block_sparse_cases.hpp, linear_cases.hpp, ...):
// copies each host tensor (whole buffer, padding included, same strides) to device memory, calls
// the attnkit::cuda operator on a stream, waits with attnkit::cuda::synchronize and copies the
// outputs back.
#pragma once

#include <attnkit/cuda/flash.cuh>  // first: includes the core headers the way nvcc wants them
#include <attnkit/cuda/block_sparse.cuh>
#include <attnkit/cuda/circular.cuh>
#include <attnkit/cuda/linear.cuh>

#include <optional>

#include "flash_cases.hpp"

namespace attnkit::test::cuda_cases {

inline void cuda_require(cudaError_t e, const char* what) {
  if (e != cudaSuccess) FAIL(what << ": " << cudaGetErrorName(e) << ": " << cudaGetErrorString(e));
}

template <class T>
struct device_buffer {
  T* ptr = nullptr;
  std::size_t count = 0;
  explicit device_buffer(std::size_t n) : count(n) {
    void* p = nullptr;
    cuda_require(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    ptr = static_cast<T*>(p);
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { (void)cudaFree(ptr); }
  void upload(const T* host) {
    if (count) cuda_require(cudaMemcpy(ptr, host, count * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  void download(T* host) const {
    if (count) cuda_require(cudaMemcpy(host, ptr, count * sizeof(T), cudaMemcpyDeviceToHost), "download");
  }
};

// The device twin of a host view into `host_buf`: same extents, strides and offset into the buffer.
template <class T, std::size_t R>
struct device_view {
  device_buffer<std::remove_const_t<T>> buf;
  tensor_view<std::remove_const_t<T>, R> view;
  device_view(const std::vector<std::remove_const_t<T>>& host_buf, const tensor_view<T, R>& host_view)
      : buf(host_buf.size()) {
    buf.upload(host_buf.data());
    if (host_view.data() != nullptr)
      view = tensor_view<std::remove_const_t<T>, R>(buf.ptr + (host_view.data() - host_buf.data()),
                                                    host_view.extents(), host_view.strides());
  }
  void download(std::vector<std::remove_const_t<T>>& host_buf) const { buf.download(host_buf.data()); }
};

struct gpu_backend {
  cudaStream_t stream = nullptr;

  // q, k, v and the parameter arrays of a problem in device memory.
  template <class T>
  struct device_problem {
    device_view<T, 4> q, k, v;
    std::optional<device_view<const float, 4>> bias;
    device_buffer<float> slopes;
    device_buffer<index_t> lengths;
    attention_params params;  // the problem's parameters with device copies of the arrays
    explicit device_problem(const problem<T>& p)
        : q(p.q.buf, p.q.view), k(p.k.buf, p.k.view), v(p.v.buf, p.v.view), slopes(p.slopes.size()),
          lengths(p.lengths.size()), params(p.params) {
      if (p.params.bias.data() != nullptr) {
        bias.emplace(p.bias_buf, p.params.bias);
        params.bias = bias->view;
      }
      slopes.upload(p.slopes.data());
      if (p.params.alibi_slopes) params.alibi_slopes = slopes.ptr;
      lengths.upload(p.lengths.data());
      if (p.params.kv_lengths) params.kv_lengths = lengths.ptr;
    }
  };

  // Runs op(q, k, v, out, params, lse) on device copies and downloads out and lse.
  template <class T, class TO, class Op>
  void attention(const problem<T>& p, tensor4<TO>& out, tensor3<TO>* lse, Op&& op) {
    device_problem<T> d(p);
    device_view<TO, 4> o(out.buf, out.view);
    std::optional<device_view<TO, 3>> l;
    if (lse) l.emplace(lse->buf, lse->view);
    op(tensor_view<const T, 4>(d.q.view), tensor_view<const T, 4>(d.k.view), tensor_view<const T, 4>(d.v.view),
       o.view, d.params, l ? l->view : tensor_view<TO, 3>{});
    cuda::synchronize(stream);
    o.download(out.buf);
    if (lse) l->download(lse->buf);
  }

  template <class T, class TO>
  void flash(const problem<T>& p, tensor4<TO>& out, tensor3<TO>* lse) {
    attention(p, out, lse, [&](auto q, auto k, auto v, auto o, const attention_params& dp, auto l) {
      cuda::flash_attention(q, k, v, o, dp, l, stream);
    });
  }

  template <class T, class TO>
  void block_sparse(const problem<T>& p, const block_mask& mask, tensor4<TO>& out, tensor3<TO>* lse) {
    attention(p, out, lse, [&](auto q, auto k, auto v, auto o, const attention_params& dp, auto l) {
      cuda::block_sparse_attention(q, k, v, o, mask, dp, l, stream);
    });
  }

  template <class T, class TO>
  void linear(const tensor4<T>& q, const tensor4<T>& k, const tensor4<T>& v, tensor4<TO>& out,
              const linear_params& p) {
    device_view<T, 4> dq(q.buf, q.view), dk(k.buf, k.view), dv(v.buf, v.view);
    device_view<TO, 4> o(out.buf, out.view);
    cuda::linear_attention(tensor_view<const T, 4>(dq.view), tensor_view<const T, 4>(dk.view),
                           tensor_view<const T, 4>(dv.view), o.view, p, stream);
    cuda::synchronize(stream);
    o.download(out.buf);
  }

  template <class TL, class TV, class TO>
  void circular(const tensor3<TL>& l, const tensor4<TV>& v, tensor4<TO>& out, const circular_params& p) {
    device_view<TL, 3> dl(l.buf, l.view);
    device_view<TV, 4> dv(v.buf, v.view);
    device_view<TO, 4> o(out.buf, out.view);
    cuda::circular_attention(tensor_view<const TL, 3>(dl.view), tensor_view<const TV, 4>(dv.view), o.view, p, stream);
    cuda::synchronize(stream);
    o.download(out.buf);
  }

  template <class TO>
  void merge(const tensor4<TO>& oa, const tensor3<TO>& la, const tensor4<TO>& ob, const tensor3<TO>& lb,
             tensor4<TO>& o, tensor3<TO>* l, bool in_place) {
    device_view<TO, 4> da(oa.buf, oa.view), db(ob.buf, ob.view), dout(o.buf, o.view);
    device_view<TO, 3> dla(la.buf, la.view), dlb(lb.buf, lb.view);
    std::optional<device_view<TO, 3>> dl;
    if (l && !in_place) dl.emplace(l->buf, l->view);
    // In place: the outputs are the very device buffers of side a.
    tensor_view<TO, 4> o_view = in_place ? da.view : dout.view;
    tensor_view<TO, 3> l_view = in_place ? dla.view : (dl ? dl->view : tensor_view<TO, 3>{});
    cuda::merge_attention_states(tensor_view<const TO, 4>(da.view), tensor_view<const TO, 3>(dla.view),
                                 tensor_view<const TO, 4>(db.view), tensor_view<const TO, 3>(dlb.view),
                                 o_view, l_view, stream);
    cuda::synchronize(stream);
    if (in_place) {
      da.download(o.buf);
      if (l) dla.download(l->buf);
    } else {
      dout.download(o.buf);
      if (l) dl->download(l->buf);
    }
  }
};

}  // namespace attnkit::test::cuda_cases
