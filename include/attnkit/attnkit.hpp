// attnkit: efficient attention kernels. Include this header for every operator.
#pragma once

#include "attnkit/core/attention_params.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/core/parallel.hpp"
#include "attnkit/core/tensor_view.hpp"
#include "attnkit/core/types.hpp"
#include "attnkit/simd/simd.hpp"
#include "attnkit/ops/reference.hpp"
#include "attnkit/ops/flash.hpp"
#include "attnkit/ops/linear.hpp"
#include "attnkit/ops/sparse.hpp"
#include "attnkit/ops/block_sparse.hpp"
#include "attnkit/ops/xattention.hpp"
#include "attnkit/ops/circular.hpp"
