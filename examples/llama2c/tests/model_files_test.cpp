// Where the model is looked for: LOWBIT_LLAMA2C_DIR overrides the build's default.
#include "llama2c/model_files.hpp"

#include <gtest/gtest.h>

#include <cstdlib>

namespace llama2c {
namespace {

TEST(ModelFiles, NamesTheStoriesFiles) {
  const ModelFiles files = ModelFiles::in("/models");
  EXPECT_EQ(files.checkpoint, std::filesystem::path("/models/stories260K.bin"));
  EXPECT_EQ(files.tokenizer, std::filesystem::path("/models/tok512.bin"));
  EXPECT_EQ(files.text, std::filesystem::path("/models/tinystories_valid_30KB.txt"));
  EXPECT_EQ(files.reference, std::filesystem::path("/models/stories260K_reference.json"));
}

TEST(ModelFiles, EnvironmentOverridesTheDefault) {
  const char* saved = std::getenv("LOWBIT_LLAMA2C_DIR");
  const std::string restore = saved ? saved : "";
  ::setenv("LOWBIT_LLAMA2C_DIR", "/from/env", 1);
  EXPECT_EQ(model_dir("/built/in"), std::filesystem::path("/from/env"));
  ::setenv("LOWBIT_LLAMA2C_DIR", "", 1);
  EXPECT_EQ(model_dir("/built/in"), std::filesystem::path("/built/in"));
  ::unsetenv("LOWBIT_LLAMA2C_DIR");
  EXPECT_EQ(model_dir("/built/in"), std::filesystem::path("/built/in"));
  if (saved) ::setenv("LOWBIT_LLAMA2C_DIR", restore.c_str(), 1);
}

}  // namespace
}  // namespace llama2c
