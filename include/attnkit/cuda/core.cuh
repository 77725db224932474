// attnkit's core headers as the CUDA layer includes them. Eigen 3.4 (pulled in by core/types.hpp)
// marks defaulted special members __host__ __device__, which nvcc reports as warning 20012 inside
// Eigen's own headers; that one diagnostic is silenced while the core headers are parsed. (Eigen's
// related 20013/20015 constexpr notes are emitted at the end of the translation unit, outside any
// push/pop scope: the attnkit::cuda CMake target passes --expt-relaxed-constexpr, which Eigen
// recommends for CUDA builds.) Include this before anything else that includes Eigen.
#pragma once

#if defined(__NVCC__)
#pragma nv_diagnostic push
#pragma nv_diag_suppress 20012
#endif
#include "attnkit/core/attention_params.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/tensor_view.hpp"
#include "attnkit/core/types.hpp"
#if defined(__NVCC__)
#pragma nv_diagnostic pop
#endif
