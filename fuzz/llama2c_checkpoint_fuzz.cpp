// libFuzzer target: the llama2.c checkpoint loader (examples/llama2c) on arbitrary bytes,
// parsed from memory as load_checkpoint() parses a file's contents. Every input must
// load or throw lowbit::Error; a loaded model must have the shapes its header claims.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "llama2c/checkpoint.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto bytes = std::as_bytes(std::span<const std::uint8_t>(data, size));
    const llama2c::Weights w = llama2c::parse_checkpoint(bytes, "fuzz");
    const llama2c::Config& c = w.config;
    // The loader promised these shapes; a mismatch is a bug, so make it a crash.
    if (w.token_embedding.rows() != c.vocab_size || w.token_embedding.cols() != c.dim ||
        static_cast<int>(w.layers.size()) != c.n_layers || w.rms_final.size() != c.dim ||
        w.output().rows() != c.vocab_size)
      std::abort();
    for (const auto& layer : w.layers)
      if (layer.wk.rows() != c.kv_dim() || layer.w2.cols() != c.hidden_dim) std::abort();
  } catch (const lowbit::Error&) {
  }
  return 0;
}
