// attnkit::error and the argument checks every public entry point runs before touching memory.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

namespace attnkit {

// Thrown for every invalid argument. The message reads
//   "<function>: <argument>: expected <what>, got <value>".
class error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

[[noreturn]] inline void fail(std::string_view fn, std::string_view arg, std::string_view expected,
                              std::string_view got) {
  throw error(concat(fn, ": ", arg, ": expected ", expected, ", got ", got));
}

// Message parts kept unformatted until a check fails: text("extent(", i, ")") costs a few copies,
// not a string, on the path where the check passes.
template <class... Parts>
struct lazy_text {
  std::tuple<Parts...> parts;
  friend std::ostream& operator<<(std::ostream& os, const lazy_text& t) {
    std::apply([&](const auto&... p) { (os << ... << p); }, t.parts);
    return os;
  }
};

template <class... Parts>
lazy_text<std::decay_t<const Parts&>...> text(const Parts&... parts) {
  return {{parts...}};
}

// Checks `ok`; on failure throws "fn: arg: expected <expected>, got <got>". arg, expected and got
// may be strings, numbers or text(...): they are formatted only on failure.
template <class Arg, class Expected, class Got>
inline void require(bool ok, std::string_view fn, const Arg& arg, const Expected& expected, const Got& got) {
  if (!ok) fail(fn, concat(arg), concat(expected), concat(got));
}

}  // namespace detail
}  // namespace attnkit
