// Scalar GEMV kernels: the reference the SIMD variants are tested against, the path
// for double, and the generic path for group sizes the SIMD kernels do not take.
//
// Input-axis groups (stored row r = output row r), with x in stored order and the
// group sums S_g of gemv_input.hpp:
//   y_r = sum_g s_rg * (sum_{j in g} q_rj x_j - z_rg * S_g).
// Output-axis groups (stored row i = input column i, W^T stored), with a_ig = s_ig x_i:
//   y_o = sum_i a_{i,g(o)} q_io - sum_i a_{i,g(o)} z_{i,g(o)},
// the second sum once per output group.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lowbit/core/isa.hpp"
#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/pack/pack.hpp"

namespace lowbit::detail::scalar {

// y[0 .. count) for stored rows [first, first + count); x in natural stored order (no padding
// needed). `codes` is scratch of stored_cols() bytes.
template <class T>
void gemv_rows(const QuantizedMatrix<T>& W, const T* x, const T* group_sums, Index first, Index count,
               std::uint8_t* codes, T* y) {
  const Index n = W.stored_cols(), group = W.group_length(), groups = W.groups_per_row();
  for (Index r = first; r < first + count; ++r) {
    detail::unpack_row(W.packed_row(r), n, W.spec().bits, codes, Isa::Scalar);
    const float* scales = W.scales().data() + r * groups;
    const float* zeros = W.zeros().data() + r * groups;
    T sum = 0;
    for (Index g = 0; g < groups; ++g) {
      T dot = 0;
      for (Index j = g * group; j < std::min(n, (g + 1) * group); ++j) dot += static_cast<T>(codes[j]) * x[j];
      sum += static_cast<T>(scales[g]) * (dot - static_cast<T>(zeros[g]) * group_sums[g]);
    }
    y[r - first] = sum;
  }
}

// Output-axis groups: y[o] for o in one block of 256 stored columns, o = 256*block + i.
// Each output sums over all stored rows in order, so the result does not depend on
// how blocks are shared among threads.
template <class T>
void gemv_transposed_block(const QuantizedMatrix<T>& W, const T* x, Index block, T* y) {
  const Index n = W.stored_cols(), group = W.group_length(), groups = W.groups_per_row();
  const int bits = W.spec().bits;
  const Index begin = block * kBlockCodes, length = std::min(kBlockCodes, n - begin);
  const Index first_group = begin / group, last_group = (begin + length - 1) / group;
  T acc[kBlockCodes] = {};
  T offsets[kBlockCodes] = {};  // sum_i a_ig z_ig; a block of 256 outputs touches at most 256 groups
  std::uint8_t codes[kBlockCodes];
  for (Index i = 0; i < W.stored_rows(); ++i) {
    detail::unpack_row(W.packed_row(i) + begin * bits / 8, length, bits, codes, Isa::Scalar);
    const float* scales = W.scales().data() + i * groups;
    const float* zeros = W.zeros().data() + i * groups;
    for (Index g = first_group; g <= last_group; ++g) {
      const T a = static_cast<T>(scales[g]) * x[i];
      offsets[g - first_group] += a * static_cast<T>(zeros[g]);
      for (Index o = std::max(begin, g * group); o < std::min(begin + length, (g + 1) * group); ++o)
        acc[o - begin] += a * static_cast<T>(codes[o - begin]);
    }
  }
  for (Index o = 0; o < length; ++o) y[begin + o] = acc[o] - offsets[(begin + o) / group - first_group];
}

}  // namespace lowbit::detail::scalar
