// libFuzzer target: HQQ layout import (hqq_format::load) on arbitrary safetensors files.
// Every input must load or throw lowbit::Error; a loaded matrix must dequantize.
#include <cstddef>
#include <cstdint>

#include "lowbit/io/hqq_format.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto file = lowbit::SafeTensors::parse(std::span<const std::uint8_t>(data, size), "fuzz");
    const auto q = lowbit::hqq_format::load<float>(file, "l");
    if (q.rows() * q.cols() <= (Eigen::Index{1} << 20)) (void)q.dequantize();
  } catch (const lowbit::Error&) {
  }
  return 0;
}
