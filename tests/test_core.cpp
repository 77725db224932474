// tensor_view, factories, sub-views, parallel_for and error reporting.
#include "test_util.hpp"

#include <atomic>
#include <numeric>

using namespace attnkit;
using attnkit::test::require_error;

TEST_CASE("bshd and bhsd factories map logical (b, s, h, d) to their memory order") {
  std::vector<int> mem(2 * 3 * 4 * 5);
  std::iota(mem.begin(), mem.end(), 0);
  const auto a = bshd(mem.data(), 2, 3, 4, 5);
  const auto b = bhsd(mem.data(), 2, 4, 3, 5);
  CHECK(a.extent(0) == 2);
  CHECK(a.extent(1) == 3);
  CHECK(a.extent(2) == 4);
  CHECK(a.extent(3) == 5);
  CHECK(b.extents() == a.extents());
  // element (b=1, s=2, h=3, d=4)
  CHECK(a(1, 2, 3, 4) == ((1 * 3 + 2) * 4 + 3) * 5 + 4);
  CHECK(b(1, 2, 3, 4) == ((1 * 4 + 3) * 3 + 2) * 5 + 4);
  CHECK(a.size() == 120);
  CHECK_FALSE(a.empty());
}

TEST_CASE("rank-3 factories are indexed (batch, head, seq)") {
  std::vector<float> mem(2 * 3 * 4);
  std::iota(mem.begin(), mem.end(), 0.f);
  const auto x = bhs(mem.data(), 2, 3, 4);
  const auto y = bsh(mem.data(), 2, 4, 3);
  CHECK(x(1, 2, 3) == (1 * 3 + 2) * 4 + 3);
  CHECK(y(1, 2, 3) == (1 * 4 + 3) * 3 + 2);
  CHECK(y.extent(1) == 3);
  CHECK(y.extent(2) == 4);
}

TEST_CASE("views convert to const views and sub-views share memory") {
  std::vector<float> mem(2 * 6 * 3 * 4);
  std::iota(mem.begin(), mem.end(), 0.f);
  const auto v = bshd(mem.data(), 2, 6, 3, 4);
  tensor_view<const float, 4> c = v;
  CHECK(c(1, 5, 2, 3) == v(1, 5, 2, 3));

  const auto s = v.slice(1, 2, 5);
  CHECK(s.extent(1) == 3);
  CHECK(&s(1, 0, 2, 1) == &v(1, 2, 2, 1));
  const auto head = v.fix(2, 1);  // (batch, seq, dim)
  static_assert(decltype(head)::rank == 3);
  CHECK(&head(1, 4, 2) == &v(1, 4, 1, 2));
  CHECK(v.slice(1, 3, 3).empty());
  require_error([&] { (void)v.slice(1, 4, 7); }, {"slice", "range"});
  require_error([&] { (void)v.fix(2, 3); }, {"fix", "index"});
}

TEST_CASE("tensor_view rejects negative extents and strides, null data and overflowing offsets") {
  float x = 0;
  require_error([&] { tensor_view<float, 2>(&x, {-1, 1}, {1, 1}); }, {"tensor_view", "extent(0)", "-1"});
  require_error([&] { tensor_view<float, 2>(&x, {1, 1}, {1, -2}); }, {"tensor_view", "stride(1)", "-2"});
  require_error([&] { tensor_view<float, 2>(nullptr, {2, 2}, {2, 1}); }, {"tensor_view", "data", "nullptr"});
  const index_t big = index_t(1) << 40;
  require_error([&] { tensor_view<float, 2>(&x, {big, big}, {big, 1}); }, {"tensor_view", "overflow"});
  // Empty views may be null; stride 0 broadcasts.
  CHECK(tensor_view<float, 2>(nullptr, {0, 5}, {5, 1}).empty());
  const tensor_view<float, 2> bc(&x, {1000, 1000}, {0, 0});
  CHECK(&bc(999, 999) == &x);
}

TEST_CASE("parallel_for visits every index exactly once in grain-sized chunks") {
  for (index_t n : {0, 1, 7, 64, 1001}) {
    for (index_t grain : {1, 3, 64}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      std::atomic<bool> bad_chunk{false};
      parallel_for(n, grain, [&](index_t b, index_t e) {
        if (b % grain != 0 || e - b > grain || (e - b < grain && e != n)) bad_chunk = true;
        for (index_t i = b; i < e; ++i) hits[static_cast<std::size_t>(i)]++;
      });
      CHECK_FALSE(bad_chunk);
      CHECK(std::all_of(hits.begin(), hits.end(), [](const std::atomic<int>& h) { return h == 1; }));
    }
  }
}

TEST_CASE("parallel_for rethrows an exception from a worker on the caller") {
  CHECK_THROWS_WITH(parallel_for(100, 1,
                                 [](index_t b, index_t) {
                                   if (b == 57) throw attnkit::error("boom");
                                 }),
                    "boom");
}

TEST_CASE("attnkit::error is an invalid_argument carrying a readable message") {
  try {
    detail::require(false, "fn", "arg", "something", 42);
    FAIL("no throw");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()) == "fn: arg: expected something, got 42");
  }
}
