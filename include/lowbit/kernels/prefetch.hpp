// Software prefetch of the rows a GEMV thread reads next.
//
// The row kernels take four rows a quarter of the matrix apart (gemv.hpp, row_task), so
// each of the four is a sequential stream through the packed codes. While a kernel
// computes on block `blk` of its rows it asks for block `blk` of the row after each of
// them, which the next task reads: the hardware prefetcher follows each stream too, but
// restarts slowly where a short row (2 KiB for 4096 4-bit codes) ends. The hint fills L2,
// not L1 (prefetcht1): on Zen 4, L1-filling prefetches of four streams held a cold
// 4096 x 4096 4-bit GEMV at 14 GB/s, L2-filling ones reached 20 GB/s. Prefetches never
// fault, but the address is still kept inside the storage (no pointer past the end is
// formed).
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

}  // namespace lowbit::detail
