// Software prefetch of the next rows a GEMV thread will read.
//
// A row of a 4096-wide 4-bit matrix is 2 KiB: too short a stream for the hardware
// prefetcher to get ahead of, so a kernel that reads cold weights waits on memory at
// the start of every row. The row kernels work on a few consecutive stored rows at a
// time and a thread takes consecutive row groups, so while a kernel computes on block
// `blk` of its rows it asks for the same share of the row group after it: when the
// kernel gets there, those bytes are already on their way. Prefetches never fault, but
// the address is still kept inside the storage (no pointer past the end is formed).
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
    __builtin_prefetch(base + at, /*read*/ 0, /*keep in all levels*/ 3);
#endif
  return lines;
}

// The share of the next row group that goes with block `blk` of this one: `rows` rows
// of `row_bytes` each, `block_bytes` per row and block, starting at `first_row`.
inline void prefetch_next_row_group(const std::uint8_t* first_row, Index rows, Index row_bytes, Index block_bytes,
                                    Index blk, const std::uint8_t* end) {
  prefetch_ahead(first_row, rows * row_bytes + blk * rows * block_bytes, rows * block_bytes, end);
}

}  // namespace lowbit::detail
