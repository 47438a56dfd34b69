// HQQ's checkpoint bit packing (what engines that load HQQ files expect), both ways.
// The packer works along the first dimension of a [n, m] code matrix:
//   8-bit  a copy
//   4-bit  [n/2, m] bytes:   byte[p] = q[p] << 4 | q[p + n/2]
//   2-bit  [n/4, m] bytes:   byte[p] = q[p] << 6 | q[p + n/4] << 4 | q[p + n/2] << 2 | q[p + 3n/4]
//   3-bit  [n/10, m] int32:  word[p] = sum_k q[p + k*n/10] << (27 - 3k), k = 0..9
// (HQQ pads n to a multiple of 10 for 3-bit; we require the caller's n to fit.)
#pragma once

#include <cstdint>

#include "lowbit/core/error.hpp"
#include "lowbit/core/types.hpp"

namespace lowbit::hqq_layout {

using ByteMatrix = CodeMatrix;
using WordMatrix = Eigen::Matrix<std::int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Codes per packed element along the first dimension (10 for 3-bit words).
[[nodiscard]] inline int codes_per_element(int bits) {
  switch (bits) {
    case 8: return 1;
    case 4: return 2;
    case 2: return 4;
    case 3: return 10;
    default: detail::fail("hqq_layout: bits = ", bits, " is not one of 2, 3, 4, 8");
  }
}

namespace detail {
inline void require_codes(const Eigen::Ref<const CodeMatrix>& codes, int bits) {
  const int per = codes_per_element(bits);
  lowbit::detail::require(codes.rows() % per == 0, "hqq_layout: codes rows = ", codes.rows(),
                          " is not a multiple of ", per, " for ", bits, "-bit");
  for (Index r = 0; r < codes.rows(); ++r)
    for (Index c = 0; c < codes.cols(); ++c)
      lowbit::detail::require(codes(r, c) < (1 << bits), "hqq_layout: codes(", r, ", ", c, ") = ",
                              int(codes(r, c)), " exceeds ", (1 << bits) - 1);
}
}  // namespace detail

// 2, 4 and 8-bit: bytes [n / codes_per_element, m].
[[nodiscard]] inline ByteMatrix pack_bytes(const Eigen::Ref<const CodeMatrix>& codes, int bits) {
  lowbit::detail::require(bits != 3, "hqq_layout::pack_bytes: 3-bit packs to int32, use pack_words");
  detail::require_codes(codes, bits);
  const int per = codes_per_element(bits);
  const Index step = codes.rows() / per;
  ByteMatrix packed = ByteMatrix::Zero(step, codes.cols());
  for (int k = 0; k < per; ++k)  // plane k sits at bit 8 - bits*(k+1): first plane most significant
    for (Index p = 0; p < step; ++p)
      for (Index c = 0; c < codes.cols(); ++c)
        packed(p, c) = static_cast<std::uint8_t>(packed(p, c) | (codes(p + k * step, c) << (8 - bits * (k + 1))));
  return packed;
}

[[nodiscard]] inline CodeMatrix unpack_bytes(const Eigen::Ref<const ByteMatrix>& packed, int bits) {
  lowbit::detail::require(bits != 3, "hqq_layout::unpack_bytes: 3-bit unpacks from int32, use unpack_words");
  const int per = codes_per_element(bits);
  const Index step = packed.rows();
  CodeMatrix codes(step * per, packed.cols());
  for (int k = 0; k < per; ++k)
    for (Index p = 0; p < step; ++p)
      for (Index c = 0; c < packed.cols(); ++c)
        codes(p + k * step, c) = static_cast<std::uint8_t>((packed(p, c) >> (8 - bits * (k + 1))) & ((1 << bits) - 1));
  return codes;
}

// 3-bit: int32 words [n / 10, m], ten codes per word from bit 27 down.
[[nodiscard]] inline WordMatrix pack_words(const Eigen::Ref<const CodeMatrix>& codes) {
  detail::require_codes(codes, 3);
  const Index step = codes.rows() / 10;
  WordMatrix packed = WordMatrix::Zero(step, codes.cols());
  for (int k = 0; k < 10; ++k)
    for (Index p = 0; p < step; ++p)
      for (Index c = 0; c < codes.cols(); ++c)
        packed(p, c) = static_cast<std::int32_t>(static_cast<std::uint32_t>(packed(p, c)) |
                                                 (std::uint32_t{codes(p + k * step, c)} << (27 - 3 * k)));
  return packed;
}

[[nodiscard]] inline CodeMatrix unpack_words(const Eigen::Ref<const WordMatrix>& packed) {
  const Index step = packed.rows();
  CodeMatrix codes(step * 10, packed.cols());
  for (int k = 0; k < 10; ++k)
    for (Index p = 0; p < step; ++p)
      for (Index c = 0; c < packed.cols(); ++c)
        codes(p + k * step, c) = static_cast<std::uint8_t>((static_cast<std::uint32_t>(packed(p, c)) >> (27 - 3 * k)) & 7u);
  return codes;
}

}  // namespace lowbit::hqq_layout
