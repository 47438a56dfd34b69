// libFuzzer target: the safetensors reader on arbitrary bytes. Every input must parse
// or throw lowbit::Error; reading every tensor of a parsed file must stay in bounds.
#include <cstddef>
#include <cstdint>

#include "lowbit/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto file = lowbit::SafeTensors::parse(std::span<const std::uint8_t>(data, size), "fuzz");
    std::uint64_t sum = 0;
    for (const auto& t : file.tensors()) {
      for (std::uint8_t b : file.bytes(t)) sum += b;  // ASan checks the range
      if (lowbit::is_float_dtype(t.dtype) && t.rank() <= 2) (void)file.matrix(t.name);
      if (lowbit::is_integer_dtype(t.dtype)) (void)file.integers(t.name);
    }
    for (const auto& [key, value] : file.metadata()) sum += key.size() + value.size();
    (void)sum;
  } catch (const lowbit::Error&) {
  }
  return 0;
}
