// QuantSpec: what a quantized weight looks like (bit width, grouping, zero-point rules).
#pragma once

#include <algorithm>

#include "lowbit/core/error.hpp"
#include "lowbit/core/types.hpp"

namespace lowbit {

// How scales and zeros are stored. Half halves their share of the bytes; values are
// rounded to fp16 when the matrix is built and every consumer sees the rounded value.
enum class ParamType { Float32, Float16 };

// Which way a group runs. Input: `group_size` consecutive entries of one row of W (the
// convention of GPTQ, AutoGPTQ and HQQ's axis=1). Output: `group_size` consecutive rows
// within one input column (HQQ's axis=0); stored as the transpose.
enum class GroupAxis { Input, Output };

struct QuantSpec {
  int bits = 4;                   // 1..8
  Index group_size = 64;          // 0: one group per row (per-channel)
  bool symmetric = false;         // zero fixed at 2^(bits-1), scale from max |w|
  bool integral_zero = false;     // round the zero-point to an integer code
  ParamType param_type = ParamType::Float32;
  GroupAxis group_axis = GroupAxis::Input;

  [[nodiscard]] int max_code() const { return (1 << bits) - 1; }

  // Length of the groups of a row `length` entries long.
  [[nodiscard]] Index group_length(Index length) const {
    return group_size == 0 ? std::max<Index>(length, 1) : group_size;
  }
  [[nodiscard]] Index groups_per_row(Index length) const {
    const Index g = group_length(length);
    return length == 0 ? 0 : (length - 1) / g + 1;  // no length + g - 1: g may be near 2^63
  }

  void validate() const {
    detail::require(bits >= 1 && bits <= 8, "QuantSpec.bits = ", bits, " is outside 1..8");
    detail::require(group_size >= 0, "QuantSpec.group_size = ", group_size,
                    " is negative (use 0 for one group per row)");
  }
};

}  // namespace lowbit
