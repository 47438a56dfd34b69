// Scalar reference for packing, unpacking and dequantizing in the layout of
// layout.hpp. Every SIMD variant is held bit-exact to these functions.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "lowbit/pack/layout.hpp"

namespace lowbit::detail::scalar {

// Visits the bit position of each code of one block of t codes (t a multiple of 32,
// at most 256): fn(code_in_block, byte_in_block, bit, plane).
template <class Fn>
void for_each_position_in_block(Index t, int bits, Fn&& fn) {
  const PlaneSet set = planes_for_bits(bits);
  Index plane_byte = 0;
  for (int k = 0; k < set.count; ++k) {
    const Plane plane = set.planes[static_cast<std::size_t>(k)];
    const Index L = t * plane.width / 8;
    // Byte j of the plane holds code j + i*L at bit width*i.
    for (int i = 0; i < 8 / plane.width; ++i)
      for (Index j = 0; j < L; ++j) fn(j + i * L, plane_byte + j, plane.width * i, plane);
    plane_byte += L;
  }
}

// t codes (each masked to `bits`) -> t*bits/8 bytes.
inline void pack_block(const std::uint8_t* codes, Index t, int bits, std::uint8_t* packed) {
  std::memset(packed, 0, static_cast<std::size_t>(t * bits / 8));
  for_each_position_in_block(t, bits, [&](Index c, Index byte, int bit, Plane plane) {
    const unsigned part = (static_cast<unsigned>(codes[c]) >> plane.shift) & ((1u << plane.width) - 1u);
    packed[byte] = static_cast<std::uint8_t>(packed[byte] | (part << bit));
  });
}

inline void unpack_block(const std::uint8_t* packed, Index t, int bits, std::uint8_t* codes) {
  std::fill(codes, codes + t, std::uint8_t{0});
  for_each_position_in_block(t, bits, [&](Index c, Index byte, int bit, Plane plane) {
    const unsigned part = (static_cast<unsigned>(packed[byte]) >> bit) & ((1u << plane.width) - 1u);
    codes[c] = static_cast<std::uint8_t>(codes[c] | (part << plane.shift));
  });
}

// Calls fn(block_start, t, block_bytes_offset) for each block of a row of n codes.
template <class Fn>
void for_each_block(Index n, int bits, Fn&& fn) {
  const Index n_pad = padded_codes(n);
  for (Index start = 0; start < n_pad; start += kBlockCodes)
    fn(start, std::min(kBlockCodes, n_pad - start), start * bits / 8);
}

// codes[0..n) -> packed_row_bytes(n, bits) bytes; the padding codes are zero.
inline void pack_row(const std::uint8_t* codes, Index n, int bits, std::uint8_t* packed) {
  for_each_block(n, bits, [&](Index start, Index t, Index offset) {
    std::uint8_t block[kBlockCodes] = {};
    std::copy(codes + start, codes + std::min(n, start + t), block);
    pack_block(block, t, bits, packed + offset);
  });
}

inline void unpack_row(const std::uint8_t* packed, Index n, int bits, std::uint8_t* codes) {
  for_each_block(n, bits, [&](Index start, Index t, Index offset) {
    std::uint8_t block[kBlockCodes];
    unpack_block(packed + offset, t, bits, block);
    std::copy(block, block + std::min(t, n - start), codes + start);
  });
}

// out[i] = (codes[i] - zero[g]) * scale[g], g = (first + i) / group_size: the affine
// decode of DESIGN.md, subtraction then product in T, so every variant agrees.
template <class T>
void dequantize_codes(const std::uint8_t* codes, Index first, Index count, const float* scales,
                      const float* zeros, Index group_size, T* out) {
  for (Index i = 0; i < count;) {
    const Index g = (first + i) / group_size;
    const Index end = std::min(count, (g + 1) * group_size - first);
    const T scale = static_cast<T>(scales[g]), zero = static_cast<T>(zeros[g]);
    for (; i < end; ++i) out[i] = (static_cast<T>(codes[i]) - zero) * scale;
  }
}

// One packed row of n codes -> n values; scales/zeros hold that row's groups.
template <class T>
void dequantize_row(const std::uint8_t* packed, Index n, int bits, const float* scales,
                    const float* zeros, Index group_size, T* out) {
  for_each_block(n, bits, [&](Index start, Index t, Index offset) {
    std::uint8_t block[kBlockCodes];
    unpack_block(packed + offset, t, bits, block);
    dequantize_codes(block, start, std::min(t, n - start), scales, zeros, group_size, out + start);
  });
}

}  // namespace lowbit::detail::scalar
