// attnkit::error and the argument checks every public entry point runs before touching memory.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

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

// Checks `ok`; on failure throws with the expected/got description. The strings are built only on failure.
template <class Got>
inline void require(bool ok, std::string_view fn, std::string_view arg, std::string_view expected,
                    const Got& got) {
  if (!ok) fail(fn, arg, expected, concat(got));
}

}  // namespace detail
}  // namespace attnkit
