// ATTNKIT_HOST_DEVICE marks small functions (masking predicates, online-softmax state, index maps)
// that both the CPU operators and the CUDA kernels compile, so the CPU tests exercise them.
#pragma once

#if defined(__CUDACC__)
#define ATTNKIT_HOST_DEVICE __host__ __device__
#else
#define ATTNKIT_HOST_DEVICE
#endif
