// Element types and index type shared by every layer.
#pragma once

#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

namespace attnkit {

using index_t = std::int64_t;

using bf16 = Eigen::bfloat16;
using f16 = Eigen::half;

template <class T>
inline constexpr bool is_input_element_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16> ||
    std::is_same_v<T, f16>;

template <class T>
inline constexpr bool is_output_element_v = std::is_same_v<T, float> || std::is_same_v<T, double>;

// Accumulation type of an input element: double stays double, everything else computes in float.
template <class T>
using accum_t = std::conditional_t<std::is_same_v<std::remove_cv_t<T>, double>, double, float>;

template <class T>
inline constexpr const char* element_name() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return "float";
  else if constexpr (std::is_same_v<U, double>) return "double";
  else if constexpr (std::is_same_v<U, bf16>) return "bf16";
  else if constexpr (std::is_same_v<U, f16>) return "f16";
  else return "unsupported";
}

// Scalar conversion used by packing loops and reference code.
template <class To, class From>
inline To convert(From x) {
  if constexpr (std::is_same_v<To, From>) return x;
  else if constexpr (std::is_same_v<From, bf16> || std::is_same_v<From, f16>)
    return static_cast<To>(static_cast<float>(x));
  else return static_cast<To>(x);
}

namespace detail {
// Integer division rounding towards -infinity / +infinity (b > 0).
inline constexpr index_t floor_div(index_t a, index_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline constexpr index_t ceil_div(index_t a, index_t b) { return a >= 0 ? (a + b - 1) / b : -(-a / b); }
}  // namespace detail

}  // namespace attnkit
