// The few sm_80 instructions the kernels need, one inline-PTX wrapper each: cp.async (global ->
// shared without registers), ldmatrix (shared -> mma fragments) and mma.sync m16n8k16 with bf16 or
// f16 inputs and f32 accumulators.
//
// Fragment layouts of mma.sync.m16n8k16.row.col (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"), with g = lane / 4 and t = lane % 4; a .b32 register holds two 16-bit
// elements, the lower-indexed one in the low half:
//   A (16x16, row-major):  reg0 = A[g][2t..2t+1],   reg1 = A[g+8][2t..2t+1],
//                          reg2 = A[g][2t+8..2t+9], reg3 = A[g+8][2t+8..2t+9]
//   B (16x8, "col"):       reg0 = B[2t..2t+1][g],   reg1 = B[2t+8..2t+9][g]
//   C/D (16x8, f32):       c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i and
// register i of every lane receives M_i[g][2t..2t+1] (plain) or M_i[2t..2t+1][g] (.trans).
#pragma once

#if !defined(__CUDACC__) && !defined(ATTNKIT_CUDA_EMULATION)
#error "attnkit/cuda headers contain CUDA kernels: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "attnkit/cuda/core.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error \
    "attnkit CUDA kernels need sm_80 or newer (mma.sync m16n8k16 bf16, ldmatrix, cp.async): set CMAKE_CUDA_ARCHITECTURES to 80 or above"
#endif

namespace attnkit::cuda::detail {

// Device-side storage of a q/k/v element type. bf16 and f16 travel as raw 16-bit patterns (the
// host types are Eigen's, which device code does not need); the tag selects the mma variant.
template <class T>
struct element_traits;
template <>
struct element_traits<float> {
  using storage = float;
  static constexpr bool tensor_core = false;
};
template <>
struct element_traits<double> {
  using storage = double;
  static constexpr bool tensor_core = false;
};
template <>
struct element_traits<attnkit::bf16> {
  using storage = std::uint16_t;
  static constexpr bool tensor_core = true;
  static constexpr bool is_bf16 = true;
};
template <>
struct element_traits<attnkit::f16> {
  using storage = std::uint16_t;
  static constexpr bool tensor_core = true;
  static constexpr bool is_bf16 = false;
};
static_assert(sizeof(attnkit::bf16) == 2 && sizeof(attnkit::f16) == 2,
              "attnkit::bf16/f16 must be plain 16-bit patterns to be copied to the device as such");

}  // namespace attnkit::cuda::detail

#if defined(ATTNKIT_CUDA_EMULATION)
// Test-only: tests/cuda/emulation provides CPU versions of the instructions below (and of the CUDA
// built-ins the kernels use) so that the kernels' index arithmetic can be run without a GPU.
// It defines cp_async_16, cp_async_commit, cp_async_wait_all, ldmatrix_x4, ldmatrix_x4_trans and
// mma_16816 in attnkit::cuda::detail with the semantics documented above.
#include ATTNKIT_CUDA_EMULATION
#else
namespace attnkit::cuda::detail {

__device__ __forceinline__ std::uint32_t smem_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared (both 16-byte aligned). .cg bypasses L1: every tile
// is read once per block.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(smem_dst)), "l"(gmem_src)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits for all of this thread's outstanding cp.async groups; a __syncthreads() must follow before
// other threads read the data.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row_address)));
}

// D = A * B + D for one 16x8x16 tile; A and B hold bf16 (IsBf16) or f16, D is f32.
template <bool IsBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                          std::uint32_t b1) {
  if constexpr (IsBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace attnkit::cuda::detail
#endif  // ATTNKIT_CUDA_EMULATION

namespace attnkit::cuda::detail {

// Two floats rounded to nearest into one register of two 16-bit elements, `lo` in the low half
// (the element with the smaller column index in an A fragment).
template <bool IsBf16>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi) {
  std::uint32_t l, h;
  if constexpr (IsBf16) {
    l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  } else {
    l = __half_as_ushort(__float2half_rn(lo));
    h = __half_as_ushort(__float2half_rn(hi));
  }
  return l | (h << 16);
}

}  // namespace attnkit::cuda::detail
