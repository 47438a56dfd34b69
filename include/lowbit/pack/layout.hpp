// The packed code layout: one layout for every bit width, chosen so that one vector
// load yields runs of consecutive codes on any SIMD width.
//
// A row of n codes is padded with zero codes to n_pad = roundup(n, 32) and cut into
// blocks of 256 codes (the last block may be shorter: t = n_pad - 256*k, a multiple
// of 32). A `bits`-wide code is split into power-of-two planes, low bits first:
//
//   bits   1    2    3      4    5      6      7        8
//   planes 1    2    2+1    4    4+1    4+2    4+2+1    8
//
// Within a block of t codes, each plane of width p takes L = t*p/8 bytes, planes one
// after another. Byte j of a plane holds, at bit p*i, the plane's bits of code
// j + i*L (i = 0 .. 8/p - 1). For a full 4-bit block (L = 128):
//
//     byte:      0        1       ...    127
//     bits 0-3:  code 0   code 1  ...    code 127
//     bits 4-7:  code 128 code 129 ...   code 255
//
// and for 3 bits, a 64-byte 2-bit plane (byte j: codes j, j+64, j+128, j+192, two
// bits each) followed by a 32-byte 1-bit plane (byte j: bit i of code j + 32i is the
// code's bit 2). Loading V bytes at plane offset o (V | L, o multiple of V) gives
// 8/p runs of V consecutive codes with one shift and one mask per run: no shuffles.
// A row takes n_pad * bits / 8 bytes exactly; rows are stored back to back.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "lowbit/core/error.hpp"
#include "lowbit/core/types.hpp"

namespace lowbit::detail {

inline constexpr Index kBlockCodes = 256;  // codes per full block
inline constexpr Index kPadCodes = 32;     // rows are padded to a multiple of this

struct Plane {
  int width;   // p: 1, 2, 4 or 8 bits
  int shift;   // position of the plane's bits within the code
};

struct PlaneSet {
  int count = 0;
  std::array<Plane, 3> planes{};
};

// Plane decomposition of a bit width (table above).
[[nodiscard]] constexpr PlaneSet planes_for_bits(int bits) {
  PlaneSet set;
  int shift = 0;
  for (int width : {8, 4, 2, 1}) {
    if (bits - shift >= width) {
      set.planes[static_cast<std::size_t>(set.count++)] = Plane{width, shift};
      shift += width;
    }
  }
  return set;
}

[[nodiscard]] constexpr Index padded_codes(Index n) {
  return (n + kPadCodes - 1) / kPadCodes * kPadCodes;
}

// Bytes one packed row of n codes occupies.
[[nodiscard]] constexpr Index packed_row_bytes(Index n, int bits) {
  return padded_codes(n) * bits / 8;
}

// Calls fn(std::integral_constant<int, B>{}) with B == bits, so kernels can be
// templates on the bit width while callers pass it at run time.
template <class Fn>
decltype(auto) with_bits(int bits, Fn&& fn) {
  switch (bits) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    default: fail("bits = ", bits, " is outside 1..8");
  }
}

static_assert(planes_for_bits(3).count == 2 && planes_for_bits(3).planes[0].width == 2 &&
              planes_for_bits(3).planes[1].width == 1 && planes_for_bits(3).planes[1].shift == 2);
static_assert(planes_for_bits(7).count == 3 && planes_for_bits(8).count == 1 &&
              planes_for_bits(8).planes[0].width == 8);
static_assert(packed_row_bytes(172, 4) == 96 && packed_row_bytes(256, 3) == 96);

}  // namespace lowbit::detail
