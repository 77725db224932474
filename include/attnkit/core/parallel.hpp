// parallel_for: the one place that talks to OpenMP.
#pragma once

#include <algorithm>
#include <exception>

#include "attnkit/core/types.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace attnkit {

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_index() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Calls f(begin, end) on consecutive chunks of [0, n) of `grain` items each (the last may be shorter).
// Chunks depend on n and grain only, never on the thread count, so any per-chunk arithmetic is
// identical whatever OMP_NUM_THREADS is. Chunks are handed out dynamically, which balances uneven
// work such as causal rows. The first exception thrown by f is rethrown on the calling thread.
template <class F>
void parallel_for(index_t n, index_t grain, F&& f) {
  if (n <= 0) return;
  grain = std::max<index_t>(grain, 1);
  const index_t chunks = (n + grain - 1) / grain;
#if defined(_OPENMP)
  if (chunks > 1 && omp_get_max_threads() > 1 && !omp_in_parallel()) {
    std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic, 1)
    for (index_t c = 0; c < chunks; ++c) {
      try {
        f(c * grain, std::min(n, (c + 1) * grain));
      } catch (...) {
#pragma omp critical(attnkit_parallel_for_failure)
        if (!failure) failure = std::current_exception();
      }
    }
    if (failure) std::rethrow_exception(failure);
    return;
  }
#endif
  for (index_t c = 0; c < chunks; ++c) f(c * grain, std::min(n, (c + 1) * grain));
}

}  // namespace attnkit
