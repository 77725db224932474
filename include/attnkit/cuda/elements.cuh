// Element access for the kernels that read q/k/v/v-like tensors element by element (linear,
// circular): a strided rank-4 view as a kernel argument, and the conversion of a stored element
// (float, double, or the raw 16-bit pattern of bf16/f16, see mma.cuh) to the accumulation type.
#pragma once

#if !defined(__CUDACC__) && !defined(ATTNKIT_CUDA_EMULATION)
#error "attnkit/cuda headers contain CUDA kernels: compile this translation unit with nvcc (a .cu file)"
#endif

#include <type_traits>

#include "attnkit/cuda/core.cuh"
#include "attnkit/cuda/mma.cuh"

namespace attnkit::cuda::detail {

// Storage type on the device of an element type (const or not) of a host view.
template <class T>
using storage_t = typename element_traits<std::remove_const_t<T>>::storage;

// A rank-4 view with logical axes (batch, seq, head, dim) as a kernel argument.
template <class E>
struct strided4 {
  E* p = nullptr;
  index_t s[4]{};
  __device__ __forceinline__ E* at(index_t b, index_t t, index_t h, index_t d) const {
    return p + b * s[0] + t * s[1] + h * s[2] + d * s[3];
  }
};

template <class T, std::size_t R>
strided4<std::conditional_t<std::is_const_v<T>, const storage_t<T>, storage_t<T>>> device_strided(
    const tensor_view<T, R>& v) {
  static_assert(R == 4, "strided4 describes rank-4 views");
  using E = std::conditional_t<std::is_const_v<T>, const storage_t<T>, storage_t<T>>;
  strided4<E> r;
  r.p = reinterpret_cast<E*>(v.data());
  for (std::size_t ax = 0; ax < 4; ++ax) r.s[ax] = v.stride(ax);
  return r;
}

// The stored element *p of logical type T as Acc (bf16/f16 widened exactly to float first).
template <class Acc, class T>
__device__ __forceinline__ Acc load_as(const storage_t<T>* p) {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<U, attnkit::bf16>)
    return static_cast<Acc>(__bfloat162float(__ushort_as_bfloat16(*p)));
  else if constexpr (std::is_same_v<U, attnkit::f16>)
    return static_cast<Acc>(__half2float(__ushort_as_half(*p)));
  else
    return static_cast<Acc>(*p);
}

}  // namespace attnkit::cuda::detail
