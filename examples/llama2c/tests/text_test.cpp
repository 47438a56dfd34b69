// Evaluation text: line reading, the calibration / held-out split, and encoding.
#include "llama2c/text.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "test_model.hpp"

namespace llama2c {
namespace {

TEST(Text, ReadsNonEmptyLines) {
  const auto path = std::filesystem::path(::testing::TempDir()) / "llama2c_text_test.txt";
  {
    std::ofstream out(path, std::ios::binary);
    out << "first line\r\n\nsecond\n\r\nthird";
  }
  EXPECT_EQ(read_lines(path), (std::vector<std::string>{"first line", "second", "third"}));
  std::filesystem::remove(path);
  EXPECT_THROW((void)read_lines(path), lowbit::Error);
}

TEST(Text, HeldOutLinesNeverRepeatCalibrationLines) {
  const std::vector<std::string> lines{"Once a cat.", "once a cat.", "A dog.", "A bird.", "a dog.", "A fish.", "A bird."};
  const TextSplit split = split_lines(lines, 3);
  EXPECT_EQ(split.calibration, (std::vector<std::string>{"Once a cat.", "once a cat.", "A dog."}));
  // "a dog." repeats a calibration line, the second "A bird." a held-out one.
  EXPECT_EQ(split.held_out, (std::vector<std::string>{"A bird.", "A fish."}));
  EXPECT_EQ(split.dropped, 2u);
  EXPECT_THROW((void)split_lines(lines, lines.size()), lowbit::Error);
}

TEST(TextOnModel, SplitOfTheStoryText) {
  const auto& m = test::real_model();
  const TextSplit split = split_lines(m.lines, 6);
  EXPECT_EQ(split.calibration.size(), 6u);
  // Lines 11 and 13 repeat lines 10 and 12 exactly.
  EXPECT_EQ(split.held_out.size(), 11u);
  EXPECT_EQ(split.dropped, 2u);
  const auto sequences = encode_lines(m.tokenizer, split.held_out, m.weights.config.seq_len);
  for (const Sequence& s : sequences) {
    EXPECT_EQ(s.front(), Tokenizer::kBos);
    EXPECT_LE(static_cast<int>(s.size()), m.weights.config.seq_len);
  }
}

}  // namespace
}  // namespace llama2c
