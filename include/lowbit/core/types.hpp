// Matrix and vector aliases shared by the whole library.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <type_traits>

namespace lowbit {

using Index = Eigen::Index;

// Row-major, as PyTorch stores nn.Linear weights: W is [out_features, in_features].
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// Unpacked integer codes, one byte each, row-major.
using CodeMatrix = Eigen::Matrix<std::uint8_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

}  // namespace lowbit
