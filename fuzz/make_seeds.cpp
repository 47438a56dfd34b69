// Writes a seed corpus for the fuzz targets: small valid files of each format.
#include <cstdio>
#include <string>

#include "lowbit/io/gptq_format.hpp"
#include "lowbit/io/hqq_format.hpp"
#include "lowbit/io/lowbit_format.hpp"
#include "lowbit/quantizers/rtn.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  int n = 0;
  for (int bits : {2, 3, 4, 8}) {
    lowbit::QuantSpec spec{.bits = bits, .group_size = 32, .integral_zero = true, .param_type = lowbit::ParamType::Float16};
    const auto q = lowbit::RTN<float>(spec).quantize(lowbit::Matrix<float>::Random(32, 64));
    {
      lowbit::SafeTensorsWriter w(dir + "/seed" + std::to_string(n++) + ".safetensors");
      lowbit::lowbit_format::save(w, "m", q);
      w.set_metadata("format", "pt");
      w.commit();
    }
    {
      lowbit::SafeTensorsWriter w(dir + "/seed" + std::to_string(n++) + ".safetensors");
      lowbit::hqq_format::save(w, "l", q);
      w.commit();
    }
    if (bits == 4) {
      lowbit::SafeTensorsWriter w(dir + "/seed" + std::to_string(n++) + ".safetensors");
      lowbit::gptq_format::save(w, "l", q);
      w.commit();
    }
  }
  return 0;
}
