// Quantizes a small matrix through the umbrella header; exits non-zero on a wrong result.
#include <lowbit/lowbit.hpp>

#include <cstdio>

int main() {
  lowbit::Matrix<float> W = lowbit::Matrix<float>::Random(16, 128);
  const lowbit::RTN<float> rtn({.bits = 4, .group_size = 32});
  const auto q = rtn.quantize(W);
  const double error = (W - q.dequantize()).norm() / W.norm();
  std::printf("lowbit %s: 4-bit relative error %.4f, %zu bytes\n", LOWBIT_VERSION_STRING, error, q.packed_bytes());
  return error > 0.0 && error < 0.1 ? 0 : 1;
}
