// Row-level pack / unpack / dequantize, dispatched to the active (or a given) ISA.
#pragma once

#include <type_traits>

#include "lowbit/core/isa.hpp"
#include "lowbit/pack/avx2.hpp"
#include "lowbit/pack/avx512.hpp"
#include "lowbit/pack/scalar.hpp"

namespace lowbit::detail {

// codes[0..n) -> packed_row_bytes(n, bits) bytes at `packed`.
inline void pack_row(const std::uint8_t* codes, Index n, int bits, std::uint8_t* packed,
                     Isa isa = active_isa()) {
#if defined(LOWBIT_HAVE_AVX2)
  if (isa == Isa::Avx2 || isa == Isa::Avx512)  // packing is never the bottleneck: AVX2 serves both
    return with_bits(bits, [&](auto b) { avx2::pack_row<decltype(b)::value>(codes, n, packed); });
#endif
  (void)isa;
  scalar::pack_row(codes, n, bits, packed);
}

inline void unpack_row(const std::uint8_t* packed, Index n, int bits, std::uint8_t* codes,
                       Isa isa = active_isa()) {
#if defined(LOWBIT_HAVE_AVX512)
  if (isa == Isa::Avx512)
    return with_bits(bits, [&](auto b) { avx512::unpack_row<decltype(b)::value>(packed, n, codes); });
#endif
#if defined(LOWBIT_HAVE_AVX2)
  if (isa == Isa::Avx2)
    return with_bits(bits, [&](auto b) { avx2::unpack_row<decltype(b)::value>(packed, n, codes); });
#endif
  (void)isa;
  scalar::unpack_row(packed, n, bits, codes);
}

// One packed row -> n values of T. SIMD variants exist for float; double is scalar.
template <class T>
void dequantize_row(const std::uint8_t* packed, Index n, int bits, const float* scales,
                    const float* zeros, Index group_size, T* out, Isa isa = active_isa()) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(LOWBIT_HAVE_AVX512)
    if (isa == Isa::Avx512)
      return with_bits(bits, [&](auto b) {
        avx512::dequantize_row<decltype(b)::value>(packed, n, scales, zeros, group_size, out);
      });
#endif
#if defined(LOWBIT_HAVE_AVX2)
    if (isa == Isa::Avx2)
      return with_bits(bits, [&](auto b) {
        avx2::dequantize_row<decltype(b)::value>(packed, n, scales, zeros, group_size, out);
      });
#endif
  }
  (void)isa;
  scalar::dequantize_row(packed, n, bits, scales, zeros, group_size, out);
}

}  // namespace lowbit::detail
