// tensor_view: a non-owning strided view (pointer + extents + strides, all in elements).
#pragma once

#include <array>
#include <cstddef>
#include <limits>
#include <type_traits>

#include "attnkit/core/error.hpp"
#include "attnkit/core/types.hpp"

namespace attnkit {

template <class T, std::size_t Rank>
class tensor_view {
  static_assert(Rank >= 1, "tensor_view needs at least one axis");

 public:
  using element_type = T;
  using extents_type = std::array<index_t, Rank>;
  static constexpr std::size_t rank = Rank;

  constexpr tensor_view() = default;

  // Extents and strides must be non-negative (stride 0 broadcasts) and the largest reachable offset
  // must fit in index_t; a violation throws attnkit::error instead of producing a view that wraps.
  tensor_view(T* data, extents_type extents, extents_type strides)
      : data_(data), extents_(extents), strides_(strides) {
    index_t last = 0;
    bool empty_view = false;
    for (std::size_t i = 0; i < Rank; ++i) {
      detail::require(extents_[i] >= 0, "tensor_view", detail::text("extent(", i, ")"), "a value >= 0",
                      extents_[i]);
      detail::require(strides_[i] >= 0, "tensor_view", detail::text("stride(", i, ")"), "a value >= 0",
                      strides_[i]);
      if (extents_[i] == 0) empty_view = true;
    }
    if (empty_view) return;
    for (std::size_t i = 0; i < Rank; ++i) {
      index_t term = 0;
      const bool overflow = __builtin_mul_overflow(extents_[i] - 1, strides_[i], &term) ||
                            __builtin_add_overflow(last, term, &last);
      detail::require(!overflow, "tensor_view", "extents and strides",
                      "a largest offset that fits in 64-bit index_t", "an overflowing offset");
    }
    detail::require(data_ != nullptr, "tensor_view", "data", "a non-null pointer for a non-empty view",
                    "nullptr");
  }

  // A view of T converts to a view of const T.
  template <class U, std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>, int> = 0>
  constexpr tensor_view(const tensor_view<U, Rank>& other)  // NOLINT(google-explicit-constructor)
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  constexpr T* data() const { return data_; }
  constexpr index_t extent(std::size_t i) const { return extents_[i]; }
  constexpr index_t stride(std::size_t i) const { return strides_[i]; }
  constexpr const extents_type& extents() const { return extents_; }
  constexpr const extents_type& strides() const { return strides_; }

  constexpr index_t size() const {
    index_t n = 1;
    for (auto e : extents_) n *= e;
    return n;
  }
  constexpr bool empty() const { return size() == 0; }

  template <class... I>
  constexpr T& operator()(I... idx) const {
    static_assert(sizeof...(I) == Rank, "tensor_view: wrong number of indices");
    const std::array<index_t, Rank> ii{static_cast<index_t>(idx)...};
    index_t off = 0;
    for (std::size_t a = 0; a < Rank; ++a) off += ii[a] * strides_[a];
    return data_[off];
  }

  // Same rank, axis restricted to [begin, end).
  tensor_view slice(std::size_t axis, index_t begin, index_t end) const {
    detail::require(axis < Rank, "tensor_view::slice", "axis", detail::text("< ", Rank), axis);
    detail::require(0 <= begin && begin <= end && end <= extents_[axis], "tensor_view::slice", "range",
                    detail::text("0 <= begin <= end <= ", extents_[axis]),
                    detail::text("[", begin, ", ", end, ")"));
    tensor_view r = *this;
    r.extents_[axis] = end - begin;
    if (end > begin) r.data_ = data_ + begin * strides_[axis];
    return r;
  }

  // Rank - 1 view with `axis` fixed at `index`.
  template <std::size_t R = Rank, std::enable_if_t<(R > 1), int> = 0>
  tensor_view<T, Rank - 1> fix(std::size_t axis, index_t index) const {
    detail::require(axis < Rank, "tensor_view::fix", "axis", detail::text("< ", Rank), axis);
    detail::require(0 <= index && index < extents_[axis], "tensor_view::fix", "index",
                    detail::text("in [0, ", extents_[axis], ")"), index);
    std::array<index_t, Rank - 1> e{}, s{};
    for (std::size_t a = 0, o = 0; a < Rank; ++a) {
      if (a == axis) continue;
      e[o] = extents_[a];
      s[o++] = strides_[a];
    }
    return tensor_view<T, Rank - 1>(data_ + index * strides_[axis], e, s);
  }

 private:
  T* data_ = nullptr;
  extents_type extents_{};
  extents_type strides_{};
};

// Rank-4 attention tensors, logical axes (batch, seq, head, dim).
template <class T>
tensor_view<T, 4> bshd(T* p, index_t B, index_t S, index_t H, index_t D) {
  return tensor_view<T, 4>(p, {B, S, H, D}, {S * H * D, H * D, D, 1});
}
template <class T>
tensor_view<T, 4> bhsd(T* p, index_t B, index_t H, index_t S, index_t D) {
  return tensor_view<T, 4>(p, {B, S, H, D}, {H * S * D, D, S * D, 1});
}

// Rank-3 per-position scalars, logical axes (batch, head, seq).
template <class T>
tensor_view<T, 3> bhs(T* p, index_t B, index_t H, index_t S) {
  return tensor_view<T, 3>(p, {B, H, S}, {H * S, S, 1});
}
template <class T>
tensor_view<T, 3> bsh(T* p, index_t B, index_t S, index_t H) {
  return tensor_view<T, 3>(p, {B, H, S}, {S * H, 1, H});
}

// Row-major rank-2 view (rows, cols), e.g. a projection matrix.
template <class T>
tensor_view<T, 2> matrix(T* p, index_t rows, index_t cols) {
  return tensor_view<T, 2>(p, {rows, cols}, {cols, 1});
}

}  // namespace attnkit
