// Where the model lives: a directory with the checkpoint, its tokenizer, the evaluation
// text and the reference figures. The directory is, in order of precedence, the one a
// program is given, the environment variable LOWBIT_LLAMA2C_DIR, or the build's default
// (CMake's LOWBIT_LLAMA2C_DIR, ../shared/models beside the source tree).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

namespace llama2c {

struct ModelFiles {
  std::filesystem::path checkpoint, tokenizer, text, reference;

  // The stories260K files in `dir`; any may be replaced afterwards.
  [[nodiscard]] static ModelFiles in(const std::filesystem::path& dir) {
    return {dir / "stories260K.bin", dir / "tok512.bin", dir / "tinystories_valid_30KB.txt",
            dir / "stories260K_reference.json"};
  }
};

// LOWBIT_LLAMA2C_DIR from the environment if set and non-empty, else `build_default`.
[[nodiscard]] inline std::filesystem::path model_dir(const std::string& build_default) {
  const char* env = std::getenv("LOWBIT_LLAMA2C_DIR");
  return (env != nullptr && *env != '\0') ? std::filesystem::path(env) : std::filesystem::path(build_default);
}

}  // namespace llama2c
