// The CPU operator headers whose parameter types and argument checks the CUDA launchers reuse
// (linear_params and validate_linear, block_mask, circular_params and validate_circular). Include
// after core.cuh (or launch.cuh), which includes Eigen the way nvcc wants it; nvcc's warning 20012
// about Eigen's defaulted members is silenced here as there.
#pragma once

#include "attnkit/cuda/core.cuh"

#if defined(__NVCC__)
#pragma nv_diagnostic push
#pragma nv_diag_suppress 20012
#endif
#include "attnkit/ops/block_sparse.hpp"
#include "attnkit/ops/circular.hpp"
#include "attnkit/ops/linear.hpp"
#if defined(__NVCC__)
#pragma nv_diagnostic pop
#endif
