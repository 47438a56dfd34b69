// lowbit::Error and the argument checks every public entry point uses.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace lowbit {

// Every invalid argument, malformed file or numerical failure throws this. The
// message names the argument and the offending value.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {

template <class... Parts>
[[nodiscard]] std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw Error(concat("lowbit: ", std::forward<Parts>(parts)...));
}

template <class... Parts>
void require(bool condition, Parts&&... parts) {
  if (!condition) fail(std::forward<Parts>(parts)...);
}

// Refuses NaN/Inf anywhere in a matrix, naming the argument and the first bad entry.
// Fast path: a sum of entries is non-finite whenever one of them is (NaN and Inf
// propagate), so a finite sum of the whole matrix clears it in one vectorized pass;
// otherwise (a bad entry, or an overflow) rows whose sum is not finite are looked at
// entry by entry.
template <class Derived>
void require_finite(const Derived& m, const char* name) {
  if (std::isfinite(static_cast<double>(m.sum()))) return;
  for (Eigen::Index r = 0; r < m.rows(); ++r) {
    if (std::isfinite(static_cast<double>(m.row(r).sum()))) continue;
    for (Eigen::Index c = 0; c < m.cols(); ++c)
      if (!std::isfinite(static_cast<double>(m(r, c))))
        fail(name, "(", r, ", ", c, ") = ", static_cast<double>(m(r, c)), " is not finite");
  }
}

}  // namespace detail
}  // namespace lowbit
