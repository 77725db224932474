// Shared helpers for the test suite: owning tensors in several memory layouts, seeded random
// fills, and error measures against a double-precision reference.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <attnkit/attnkit.hpp>

namespace attnkit::test {

// Memory orders a logical (batch, seq, head, dim) tensor can have in the tests.
enum class layout {
  bshd,    // [B][S][H][D]
  bhsd,    // [B][H][S][D]
  padded,  // BSHD with gaps after every dim row, head and sequence position
  strided  // dim axis with stride 2 (interleaved with unused elements), heads outermost
};

inline const char* layout_name(layout l) {
  switch (l) {
    case layout::bshd: return "bshd";
    case layout::bhsd: return "bhsd";
    case layout::padded: return "padded";
    case layout::strided: return "strided";
  }
  return "?";
}

// An owning rank-4 tensor with logical axes (batch, seq, head, dim).
template <class T>
struct tensor4 {
  std::vector<T> buf;
  tensor_view<T, 4> view;

  tensor4() = default;
  tensor4(index_t B, index_t S, index_t H, index_t D, layout l = layout::bshd) { reset(B, S, H, D, l); }

  void reset(index_t B, index_t S, index_t H, index_t D, layout l = layout::bshd) {
    std::array<index_t, 4> st{};
    index_t total = 0;
    switch (l) {
      case layout::bshd: st = {S * H * D, H * D, D, 1}; total = B * S * H * D; break;
      case layout::bhsd: st = {H * S * D, D, S * D, 1}; total = B * S * H * D; break;
      case layout::padded: {
        const index_t sh = D + 3, ss = H * sh + 5, sb = S * ss + 7;
        st = {sb, ss, sh, 1};
        total = B * sb + 1;
        break;
      }
      case layout::strided: {
        const index_t ss = 2 * D + 1, sb = S * ss + 1, sh = B * sb + 1;
        st = {sb, ss, sh, 2};
        total = H * sh + 1;
        break;
      }
    }
    buf.assign(static_cast<std::size_t>(std::max<index_t>(total, 1)), T(std::numeric_limits<float>::quiet_NaN()));
    view = tensor_view<T, 4>(buf.data(), {B, S, H, D}, st);
  }
  tensor_view<const T, 4> cview() const { return tensor_view<const T, 4>(view); }
  T& operator()(index_t b, index_t s, index_t h, index_t d) { return view(b, s, h, d); }
};

inline std::mt19937_64 rng(std::uint64_t seed) { return std::mt19937_64(seed); }

// Fills every logical element with uniform(-amplitude, amplitude), rounded to T.
template <class T>
void fill_uniform(tensor4<T>& t, std::uint64_t seed, float amplitude = 1.f) {
  auto g = rng(seed);
  std::uniform_real_distribution<float> u(-amplitude, amplitude);
  const auto& v = t.view;
  for (index_t b = 0; b < v.extent(0); ++b)
    for (index_t s = 0; s < v.extent(1); ++s)
      for (index_t h = 0; h < v.extent(2); ++h)
        for (index_t d = 0; d < v.extent(3); ++d) v(b, s, h, d) = T(u(g));
}

// Multiplies every `every`-th logical element (in (b, s, h, d) order) by `factor`: e.g. 1e-39f makes
// subnormal floats among normal ones.
template <class T>
void scale_every(tensor4<T>& t, index_t every, float factor) {
  const auto& v = t.view;
  index_t n = 0;
  for (index_t b = 0; b < v.extent(0); ++b)
    for (index_t s = 0; s < v.extent(1); ++s)
      for (index_t h = 0; h < v.extent(2); ++h)
        for (index_t d = 0; d < v.extent(3); ++d)
          if (n++ % every == 0) v(b, s, h, d) = T(convert<float>(v(b, s, h, d)) * factor);
}

template <class T>
void fill_value(tensor4<T>& t, float value) {
  const auto& v = t.view;
  for (index_t b = 0; b < v.extent(0); ++b)
    for (index_t s = 0; s < v.extent(1); ++s)
      for (index_t h = 0; h < v.extent(2); ++h)
        for (index_t d = 0; d < v.extent(3); ++d) v(b, s, h, d) = T(value);
}

// A contiguous double copy of a view (the reference operators' input in the tests).
template <class T>
tensor4<double> to_double(const tensor_view<T, 4>& v) {
  tensor4<double> r(v.extent(0), v.extent(1), v.extent(2), v.extent(3));
  for (index_t b = 0; b < v.extent(0); ++b)
    for (index_t s = 0; s < v.extent(1); ++s)
      for (index_t h = 0; h < v.extent(2); ++h)
        for (index_t d = 0; d < v.extent(3); ++d) r(b, s, h, d) = convert<double>(v(b, s, h, d));
  return r;
}

// Owning rank-3 (batch, head, seq) tensor in BHS order.
template <class T>
struct tensor3 {
  std::vector<T> buf;
  tensor_view<T, 3> view;
  tensor3(index_t B, index_t H, index_t S, T init = T(std::numeric_limits<float>::quiet_NaN()))
      : buf(static_cast<std::size_t>(std::max<index_t>(B * H * S, 1)), init), view(bhs(buf.data(), B, H, S)) {}
};

// A NaN or infinity where the other side has a different value (a finite one, or the other
// non-finite) counts as an infinite error, so that max_abs and rel() cannot pass over it.
struct error_stats {
  double max_abs = 0;   // max |got - want|
  double max_ref = 0;   // max |want| over finite values
  double rel() const { return max_abs / std::max(max_ref, 1e-30); }
  bool mismatched_nonfinite = false;  // got and want disagree on NaN/inf somewhere
};

inline void accumulate(error_stats& e, double got, double want) {
  if (!std::isfinite(want) || !std::isfinite(got)) {
    const bool same = (std::isnan(want) && std::isnan(got)) || (got == want);
    if (!same) {
      e.mismatched_nonfinite = true;
      e.max_abs = std::numeric_limits<double>::infinity();
    }
    return;
  }
  e.max_abs = std::max(e.max_abs, std::abs(got - want));
  e.max_ref = std::max(e.max_ref, std::abs(want));
}

template <class A, class B>
error_stats compare(const tensor_view<A, 4>& got, const tensor_view<B, 4>& want) {
  error_stats e;
  for (index_t b = 0; b < got.extent(0); ++b)
    for (index_t s = 0; s < got.extent(1); ++s)
      for (index_t h = 0; h < got.extent(2); ++h)
        for (index_t d = 0; d < got.extent(3); ++d)
          accumulate(e, convert<double>(got(b, s, h, d)), convert<double>(want(b, s, h, d)));
  return e;
}

template <class A, class B>
error_stats compare(const tensor_view<A, 3>& got, const tensor_view<B, 3>& want) {
  error_stats e;
  for (index_t b = 0; b < got.extent(0); ++b)
    for (index_t h = 0; h < got.extent(1); ++h)
      for (index_t s = 0; s < got.extent(2); ++s)
        accumulate(e, convert<double>(got(b, h, s)), convert<double>(want(b, h, s)));
  return e;
}

// Absolute error of log-sum-exp values (they are O(log N) in size, so absolute is the right measure).
template <class A, class B>
double lse_abs_error(const tensor_view<A, 3>& got, const tensor_view<B, 3>& want) {
  const error_stats e = compare(got, want);
  return e.mismatched_nonfinite ? std::numeric_limits<double>::infinity() : e.max_abs;
}

// Asserts that `fn` throws attnkit::error whose message contains every string in `parts`.
template <class F>
void require_error(F&& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const attnkit::error& e) {
    const std::string msg = e.what();
    INFO("message: " << msg);
    for (const auto& p : parts) CHECK(msg.find(p) != std::string::npos);
    return;
  }
  FAIL("expected attnkit::error");
}

// True when every element of the buffer still holds `sentinel` bitwise.
template <class T>
bool untouched(const std::vector<T>& buf, T sentinel) {
  return std::all_of(buf.begin(), buf.end(), [&](T x) { return std::memcmp(&x, &sentinel, sizeof(T)) == 0; });
}

}  // namespace attnkit::test
