// Host-side plumbing shared by every attnkit::cuda launcher: the core headers (included here with
// nvcc's diagnostics about Eigen silenced), CUDA runtime errors turned into attnkit::error, device
// queries and the device-pointer check.
//
// Error contract (same as the CPU operators, DESIGN.md):
//  - Invalid arguments (shapes, strides, parameter ranges, host pointers where device memory is
//    needed, unsupported head dims or devices) throw attnkit::error before anything is launched or
//    written.
//  - A failing CUDA runtime call or kernel launch throws attnkit::error whose message names the
//    launcher and the step and carries cudaGetErrorName / cudaGetErrorString.
//  - Kernels run asynchronously on the caller's stream, so a fault *during* execution surfaces at
//    the next synchronising call. attnkit::cuda::synchronize(stream) waits and reports it as
//    attnkit::error. Defining ATTNKIT_CUDA_SYNC_CHECK makes every launcher synchronise its stream
//    after launching (debugging aid; it serialises the host with the GPU).
#pragma once

#if !defined(__CUDACC__)
#error "attnkit/cuda headers contain CUDA kernels: compile this translation unit with nvcc (a .cu file)"
#endif

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "attnkit/cuda/core.cuh"

namespace attnkit::cuda {

namespace detail {

// Throws attnkit::error for a failed CUDA runtime call. `step` says what was being done.
inline void check(cudaError_t e, std::string_view fn, std::string_view step) {
  if (e == cudaSuccess) return;
  throw attnkit::error(attnkit::detail::concat(fn, ": ", step, ": CUDA error ", cudaGetErrorName(e), ": ",
                                               cudaGetErrorString(e)));
}

// After a <<<...>>> launch: configuration errors are reported by cudaGetLastError (which also
// clears them); with ATTNKIT_CUDA_SYNC_CHECK execution errors are waited for as well.
inline void check_launch(std::string_view fn, std::string_view kernel, cudaStream_t stream) {
  check(cudaGetLastError(), fn, attnkit::detail::concat("launching ", kernel));
#if defined(ATTNKIT_CUDA_SYNC_CHECK)
  check(cudaStreamSynchronize(stream), fn, attnkit::detail::concat("running ", kernel));
#else
  (void)stream;
#endif
}

struct device_info {
  int id = 0;
  int cc_major = 0, cc_minor = 0;
  int sm_count = 0;
  int smem_optin = 0;            // bytes of shared memory one block may opt in to
  bool pageable_access = false;  // the device reads plain host memory (HMM/ATS systems)
  bool memory_pools = false;     // cudaMallocAsync is available
};

inline device_info current_device(std::string_view fn) {
  device_info d;
  check(cudaGetDevice(&d.id), fn, "cudaGetDevice");
  auto attr = [&](cudaDeviceAttr a) {
    int v = 0;
    check(cudaDeviceGetAttribute(&v, a, d.id), fn, "cudaDeviceGetAttribute");
    return v;
  };
  d.cc_major = attr(cudaDevAttrComputeCapabilityMajor);
  d.cc_minor = attr(cudaDevAttrComputeCapabilityMinor);
  d.sm_count = attr(cudaDevAttrMultiProcessorCount);
  d.smem_optin = attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  d.pageable_access = attr(cudaDevAttrPageableMemoryAccess) != 0;
  d.memory_pools = attr(cudaDevAttrMemoryPoolsSupported) != 0;
  return d;
}

// The kernels use mma.sync m16n8k16 with bf16 inputs, ldmatrix and cp.async: sm_80 and newer.
inline void require_sm80(std::string_view fn, const device_info& d) {
  attnkit::detail::require(d.cc_major >= 8, fn, "device", "a GPU of compute capability 8.0 or newer (sm_80+)",
                           attnkit::detail::text("compute capability ", d.cc_major, ".", d.cc_minor));
}

inline const char* memory_type_name(cudaMemoryType t) {
  switch (t) {
    case cudaMemoryTypeUnregistered:
      return "plain host memory";
    case cudaMemoryTypeHost:
      return "pinned host memory without a device mapping";
    case cudaMemoryTypeDevice:
      return "device memory";
    case cudaMemoryTypeManaged:
      return "managed memory";
  }
  return "unknown memory";
}

// Checks that the current device can dereference p: device or managed memory, mapped pinned host
// memory, or any host memory on systems where the GPU reads pageable memory. A host pointer handed
// to a kernel would otherwise end in an illegal-address fault that poisons the whole CUDA context.
inline void require_device_pointer(std::string_view fn, std::string_view arg, const void* p,
                                   const device_info& d) {
  if (p == nullptr) return;
  cudaPointerAttributes at{};
  const cudaError_t e = cudaPointerGetAttributes(&at, p);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear the non-sticky error before reporting
    attnkit::detail::fail(fn, arg, "a pointer the CUDA device can access", cudaGetErrorString(e));
  }
  const bool ok = at.type == cudaMemoryTypeDevice || at.type == cudaMemoryTypeManaged ||
                  (at.type == cudaMemoryTypeHost && at.devicePointer == p) || d.pageable_access;
  attnkit::detail::require(ok, fn, arg,
                           "a pointer the CUDA device can access (device, managed or mapped host memory)",
                           memory_type_name(at.type));
}

// The host side of a kernel launch and its workspace.
// Lets `kernel` use `bytes` of dynamic shared memory (the default cap is 48 KiB).
template <class Kernel>
void allow_shared_memory(std::string_view fn, Kernel* kernel, std::size_t bytes, const device_info& dev) {
  attnkit::detail::require(bytes <= static_cast<std::size_t>(dev.smem_optin), fn, "device",
                           attnkit::detail::text(bytes, " bytes of shared memory per block"),
                           attnkit::detail::text(dev.smem_optin, " bytes"));
  if (bytes > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
          fn, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

// The Launcher of the plan headers (flash_plan.cuh, linear_plan.cuh, ...) for real GPUs: <<<...>>>
// on the caller's stream, launch errors checked, workspace from the stream-ordered pool, uploads
// as stream-ordered copies.
struct stream_launcher {
  std::string_view fn;
  const device_info& dev;
  cudaStream_t stream;

  template <class... Params, class... Args>
  void kernel(const char* name, void (*k)(Params...), dim3 grid, int threads, std::size_t smem_bytes,
              Args&&... args) {
    allow_shared_memory(fn, k, smem_bytes, dev);
    k<<<grid, threads, smem_bytes, stream>>>(std::forward<Args>(args)...);
    check_launch(fn, name, stream);
  }

  // Stream-ordered workspace, released on the stream however the launcher exits. On devices without
  // memory pools it is plain cudaMalloc memory, freed after the stream has drained (that launcher
  // call then waits for its kernels).
  struct buffer {
    void* ptr = nullptr;
    cudaStream_t stream = nullptr;
    bool pooled = true;
    buffer(std::string_view fn, std::size_t bytes, cudaStream_t s, bool pools) : stream(s), pooled(pools) {
      if (pooled)
        check(cudaMallocAsync(&ptr, bytes, s), fn, "cudaMallocAsync (workspace)");
      else
        check(cudaMalloc(&ptr, bytes), fn, "cudaMalloc (workspace)");
    }
    buffer(const buffer&) = delete;
    buffer& operator=(const buffer&) = delete;
    ~buffer() {
      if (ptr == nullptr) return;
      if (pooled) {
        (void)cudaFreeAsync(ptr, stream);
      } else {
        (void)cudaStreamSynchronize(stream);
        (void)cudaFree(ptr);
      }
    }
  };
  buffer workspace(std::size_t bytes) { return buffer(fn, bytes, stream, dev.memory_pools); }

  // Copies host memory into device memory in stream order; the host buffer may be reused as soon as
  // this returns (pageable memory is staged before cudaMemcpyAsync returns).
  void upload(void* dst, const void* src, std::size_t bytes) {
    if (bytes != 0)
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), fn, "cudaMemcpyAsync (parameters)");
  }
};

template <class T>
void require_device_view(std::string_view fn, std::string_view arg, const T& view, const device_info& dev) {
  if (!view.empty()) require_device_pointer(fn, arg, view.data(), dev);
}

// The checks of the softmax launchers (flash, block-sparse) before they queue anything: an sm_80+
// current device that holds every view and pointer of the call. Returns that device.
template <class TQ, class TK, class TV, class TO, class TL>
device_info require_softmax_device(std::string_view fn, const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                                   const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out,
                                   const tensor_view<TL, 3>& lse, const attention_params& params) {
  const device_info dev = current_device(fn);
  require_sm80(fn, dev);
  require_device_view(fn, "q", q, dev);
  require_device_view(fn, "k", k, dev);
  require_device_view(fn, "v", v, dev);
  require_device_view(fn, "out", out, dev);
  require_device_view(fn, "lse", lse, dev);
  require_device_view(fn, "params.bias", params.bias, dev);
  require_device_pointer(fn, "params.alibi_slopes", params.alibi_slopes, dev);
  require_device_pointer(fn, "params.kv_lengths", params.kv_lengths, dev);
  return dev;
}

}  // namespace detail

// Waits for all work queued on `stream` and throws attnkit::error if any of it failed (a kernel
// fault is reported by the first synchronising call after it happened).
inline void synchronize(cudaStream_t stream = nullptr) {
  detail::check(cudaStreamSynchronize(stream), "attnkit::cuda::synchronize", "cudaStreamSynchronize");
  detail::check(cudaGetLastError(), "attnkit::cuda::synchronize", "cudaGetLastError");
}

}  // namespace attnkit::cuda
