// libFuzzer target: AutoGPTQ layout import (gptq_format::load). The first input byte
// chooses the quantize_config (bits, group_size, desc_act, sym) the way a model's
// quantize_config.json would; the rest is a safetensors file. Every input must load or
// throw lowbit::Error; a loaded matrix must dequantize.
#include <array>
#include <cstddef>
#include <cstdint>

#include "lowbit/io/gptq_format.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  static constexpr std::array<int, 4> kBits = {2, 3, 4, 8};
  // Includes -1 (one group per row), 1, and sizes that do not divide common widths.
  static constexpr std::array<lowbit::Index, 8> kGroupSizes = {-1, 1, 7, 16, 32, 64, 128, 100};
  lowbit::gptq_format::Config config;
  config.bits = kBits[data[0] & 3];
  config.group_size = kGroupSizes[(data[0] >> 2) & 7];
  config.desc_act = (data[0] >> 5) & 1;
  config.sym = (data[0] >> 6) & 1;
  try {
    const auto file = lowbit::SafeTensors::parse(std::span<const std::uint8_t>(data + 1, size - 1), "fuzz");
    const auto q = lowbit::gptq_format::load<float>(file, "l", config);
    if (q.rows() * q.cols() <= (Eigen::Index{1} << 20)) (void)q.dequantize();
  } catch (const lowbit::Error&) {
  }
  return 0;
}
