// Software prefetch of the rows a GEMV thread reads next.
//
// The row kernels take four rows a quarter of the matrix apart (gemv.hpp, row_task), so
// each of the four is a sequential stream through the packed codes. While a kernel
// computes on block `blk` of its rows it asks for block `blk` of the row after each of
// them, which the next task reads. The hardware prefetcher follows such streams, but
// not far enough ahead for one core to reach the memory bandwidth (Zen 4, cold 4-bit
// 4096 x 4096 int8 GEMV: 0.73 ms without, 0.57-0.60 ms with). The hint fills L2, not L1
// (prefetcht1): L1-filling prefetches of four streams held a plain read of that
// matrix at 14 GB/s, L2-filling ones reached 20 GB/s. Prefetches never fault, but the
// address is still kept inside the storage (no pointer past the end is formed).
#pragma once

#include <cstdint>

#include "lowbit/core/types.hpp"

namespace lowbit::detail {

inline constexpr Index kCacheLine = 64;

// Prefetches the cache lines of [base + offset, base + offset + bytes) that lie before
// `end`; returns how many it asked for.
inline Index prefetch_ahead(const std::uint8_t* base, Index offset, Index bytes, const std::uint8_t* end) {
  const Index available = end - base;
  Index lines = 0;
  for (Index at = offset; at < offset + bytes && at < available; at += kCacheLine, ++lines)
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(base + at, /*read*/ 0, /*into L2: prefetcht1*/ 2);
#endif
  return lines;
}

// Block `blk` (`block_bytes` per row) of the stored row after each of `rows`, rows of
// `row_bytes` each.
inline void prefetch_next_rows(const std::uint8_t* const* rows, int count, Index row_bytes, Index block_bytes, Index blk,
                               const std::uint8_t* end) {
  for (int r = 0; r < count; ++r) prefetch_ahead(rows[r], row_bytes + blk * block_bytes, block_bytes, end);
}

// The scales and zeros (`groups` floats per row) of the row after each of `rows`: a
// row kernel reads them at its start and its end, short streams of their own.
inline void prefetch_next_row_params(const float* const* scales, const float* const* zeros, int count, Index groups,
                                     const float* scales_end, const float* zeros_end) {
  const auto bytes = [](const float* p) { return reinterpret_cast<const std::uint8_t*>(p); };
  const Index row = groups * static_cast<Index>(sizeof(float));
  for (int r = 0; r < count; ++r) {
    prefetch_ahead(bytes(scales[r]), row, row, bytes(scales_end));
    prefetch_ahead(bytes(zeros[r]), row, row, bytes(zeros_end));
  }
}

}  // namespace lowbit::detail
