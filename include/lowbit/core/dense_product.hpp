// Dense matrix products whose result is bit-identical for any thread count.
//
// Eigen's own multithreaded GEMM picks its depth blocking from the thread count, so the
// order of each dot product's partial sums (and the rounded result) changes with
// OMP_NUM_THREADS. Here the product is cut into fixed panels of the output, chosen from
// the shapes alone; each panel is one single-threaded Eigen GEMM (Eigen runs serially
// inside an OpenMP team), and lowbit's thread pool takes panels.
#pragma once

#include <Eigen/Core>
#include <algorithm>

#include "lowbit/core/error.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/core/types.hpp"

namespace lowbit::detail {

// Output rows (or columns) per panel: large enough that re-packing the other operand
// per panel costs under 1% of the multiply-adds, small enough to balance two threads.
inline constexpr Index kProductPanel = 128;
inline constexpr double kSerialProductWork = 65536;       // multiply-adds
inline constexpr double kParallelProductWork = 1 << 22;   // below: serial panels

// out = lhs * rhs. lhs/rhs are dense Eigen expressions: matrices, maps, blocks, or their
// .transpose(). `out` must not alias either operand.
template <class T, class Lhs, class Rhs>
void dense_product(const Lhs& lhs, const Rhs& rhs, Eigen::Ref<Matrix<T>> out) {
  require(lhs.cols() == rhs.rows(), "dense_product: inner dimensions ", lhs.cols(), " != ", rhs.rows());
  require(out.rows() == lhs.rows() && out.cols() == rhs.cols(), "dense_product: out shape ", out.rows(), "x",
          out.cols(), " != ", lhs.rows(), "x", rhs.cols());
  const Index rows = lhs.rows(), cols = rhs.cols();
  if (rows == 0 || cols == 0) return;
  if (lhs.cols() == 0) {
    out.setZero();
    return;
  }
  // Below 2 x 50000 multiply-adds Eigen's GEMM never splits work across threads (its
  // kMinTaskSize heuristic), so small products run directly, without a parallel region.
  const double depth = static_cast<double>(lhs.cols());
  const double work = static_cast<double>(rows) * static_cast<double>(cols) * depth;
  if (work < kSerialProductWork) {
    out.noalias() = lhs * rhs;
    return;
  }
  // Cut the longer side of the output, so the re-packed operand is the smaller one.
  const bool by_rows = rows >= cols;
  const Index length = by_rows ? rows : cols;
  const double line_work = static_cast<double>(by_rows ? cols : rows) * depth;  // per output row/column
  auto panel_product = [&](Index begin, Index size) {
    if (by_rows) out.middleRows(begin, size).noalias() = lhs.middleRows(begin, size) * rhs;
    else out.middleCols(begin, size).noalias() = lhs * rhs.middleCols(begin, size);
  };
  // Mid-size products stay on the calling thread (a parallel region would cost more than
  // it saves), in panels each small enough that Eigen keeps it serial too.
  if (work < kParallelProductWork && line_work < kSerialProductWork) {
    const Index panel = std::max<Index>(1, static_cast<Index>((kSerialProductWork - 1) / line_work));
    for (Index begin = 0; begin < length; begin += panel) panel_product(begin, std::min(panel, length - begin));
    return;
  }
  const Index panels = (length + kProductPanel - 1) / kProductPanel;
  // min_parallel = 1: even a single panel runs inside the OpenMP team, where Eigen
  // never spawns threads of its own.
  parallel_for(
      panels,
      [&](Index p) {
        const Index begin = p * kProductPanel;
        panel_product(begin, std::min(kProductPanel, length - begin));
      },
      1);
}

// Convenience form returning a new matrix.
template <class T, class Lhs, class Rhs>
[[nodiscard]] Matrix<T> dense_product(const Lhs& lhs, const Rhs& rhs) {
  Matrix<T> out(lhs.rows(), rhs.cols());
  dense_product<T>(lhs, rhs, out);
  return out;
}

}  // namespace lowbit::detail
