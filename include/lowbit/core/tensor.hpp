// Eigen::Tensor adapters: a rank-2 row-major Tensor or TensorMap viewed as a Matrix,
// without including the Tensor module (callers that have tensors include it).
#pragma once

#include <type_traits>

#include "lowbit/core/types.hpp"

namespace lowbit {

template <class Tensor>
concept RowMajorTensor2 = requires(const Tensor& t) {
  t.data();
  t.dimension(0);
} && Tensor::NumDimensions == 2 && static_cast<int>(Tensor::Layout) == static_cast<int>(Eigen::RowMajor);

// A read-only Matrix view of a [rows, cols] row-major tensor (no copy).
template <RowMajorTensor2 Tensor>
[[nodiscard]] auto as_matrix(const Tensor& tensor) {
  using Scalar = std::remove_const_t<std::remove_pointer_t<decltype(tensor.data())>>;
  return Eigen::Map<const Matrix<Scalar>>(tensor.data(), tensor.dimension(0), tensor.dimension(1));
}

}  // namespace lowbit
