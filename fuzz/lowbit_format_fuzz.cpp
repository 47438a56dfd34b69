// libFuzzer target: QuantizedMatrix deserialization (lowbit_format::load) on arbitrary
// safetensors files. Every input must load or throw lowbit::Error; a loaded matrix has
// finite parameters and dequantizes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "lowbit/io/lowbit_format.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto file = lowbit::SafeTensors::parse(std::span<const std::uint8_t>(data, size), "fuzz");
    for (const auto& name : lowbit::lowbit_format::matrix_names(file)) {
      try {
        const auto q = lowbit::lowbit_format::load<float>(file, name);
        if (q.rows() * q.cols() <= (Eigen::Index{1} << 20)) (void)q.dequantize();
        // Loaded parameters are finite (the loader refuses the rest).
        if (!q.scales().allFinite() || !q.zeros().allFinite()) std::abort();
      } catch (const lowbit::Error&) {
      }
    }
  } catch (const lowbit::Error&) {
  }
  return 0;
}
