// Per-thread scratch buffers: operators take their tiles from here instead of allocating per tile.
// Each thread keeps a few growable buffers alive, so memory is bounded by the largest tile set a
// thread has used.
#pragma once

#include <cstddef>
#include <vector>

namespace attnkit::kernels {

// Returns a buffer of at least n elements for `slot` (0..7) of the calling thread. Contents are
// unspecified. A later call for the same slot on the same thread may invalidate it.
template <class T>
T* thread_scratch(std::size_t slot, std::size_t n) {
  thread_local std::vector<T> buffers[8];
  auto& b = buffers[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

}  // namespace attnkit::kernels
