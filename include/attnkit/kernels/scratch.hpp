// Per-thread scratch buffers: operators take their tiles from here instead of allocating per tile.
// Each thread keeps a few growable buffers alive, so memory is bounded by the largest tile set a
// thread has used.
#pragma once

#include <algorithm>
#include <cstddef>
#include <new>

namespace attnkit::kernels {

// A grow-only, 64-byte aligned block of bytes. 64-byte alignment matters: the kernels read whole
// vectors from their tiles, and a vector that straddles two cache lines costs two accesses (with
// AVX-512 every vector of a buffer 16 bytes off a line does, which is where malloc puts large blocks).
class scratch_buffer {
 public:
  scratch_buffer() = default;
  scratch_buffer(const scratch_buffer&) = delete;
  scratch_buffer& operator=(const scratch_buffer&) = delete;
  ~scratch_buffer() { release(); }
  // At least `bytes` bytes; the contents are unspecified (kept when the buffer is large enough).
  void* get(std::size_t bytes) {
    if (bytes > cap_) {
      release();
      const std::size_t want = std::max<std::size_t>(bytes, 64);
      data_ = ::operator new(want, std::align_val_t(64));
      cap_ = want;
    }
    return data_;
  }
  void release() {
    if (data_) ::operator delete(data_, std::align_val_t(64));
    data_ = nullptr;
    cap_ = 0;
  }

 private:
  void* data_ = nullptr;
  std::size_t cap_ = 0;
};

// Returns a 64-byte aligned buffer of at least n elements for `slot` (0..7) of the calling thread.
// Contents are unspecified. A later call for the same slot on the same thread may invalidate it.
template <class T>
T* thread_scratch(std::size_t slot, std::size_t n) {
  thread_local scratch_buffer buffers[8];
  return static_cast<T*>(buffers[slot].get(n * sizeof(T)));
}

}  // namespace attnkit::kernels
