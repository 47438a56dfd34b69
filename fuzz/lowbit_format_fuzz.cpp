// libFuzzer target: the lowbit-format loader (and the HQQ / GPTQ importers) on arbitrary
// safetensors files. A valid seed corpus is made by `lowbit_format_fuzz_seed`. Every
// input must load or throw lowbit::Error.
#include <cstddef>
#include <cstdint>

#include "lowbit/io/gptq_format.hpp"
#include "lowbit/io/hqq_format.hpp"
#include "lowbit/io/lowbit_format.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto file = lowbit::SafeTensors::parse(std::span<const std::uint8_t>(data, size), "fuzz");
    for (const auto& name : lowbit::lowbit_format::matrix_names(file)) {
      try {
        const auto q = lowbit::lowbit_format::load<float>(file, name);
        if (q.rows() * q.cols() <= (1 << 20)) (void)q.dequantize();
      } catch (const lowbit::Error&) {
      }
    }
    for (const char* layer : {"l", "m"}) {
      try {
        (void)lowbit::hqq_format::load<float>(file, layer);
      } catch (const lowbit::Error&) {
      }
      try {
        lowbit::gptq_format::Config config;
        config.bits = 4;
        config.group_size = 32;
        (void)lowbit::gptq_format::load<float>(file, layer, config);
      } catch (const lowbit::Error&) {
      }
    }
  } catch (const lowbit::Error&) {
  }
  return 0;
}
