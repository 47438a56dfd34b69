// The BPE tokenizer: merge order and byte fallback on a hand-made vocabulary, file
// checks, and the real tokenizer against the reference tokens.
#include "llama2c/tokenizer.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "test_model.hpp"

namespace llama2c {
namespace {

// A tokenizer file: <unk>, BOS, EOS, the 256 byte tokens, then `pieces` with scores.
std::vector<std::byte> tokenizer_file(const std::vector<std::pair<std::string, float>>& pieces, int max_length = 8) {
  std::vector<std::byte> out;
  const auto put = [&](const void* p, std::size_t n) {
    const auto* b = static_cast<const std::byte*>(p);
    out.insert(out.end(), b, b + n);
  };
  const auto put_token = [&](const std::string& piece, float score) {
    const auto length = static_cast<std::int32_t>(piece.size());
    put(&score, 4);
    put(&length, 4);
    put(piece.data(), piece.size());
  };
  const std::int32_t max = max_length;
  put(&max, 4);
  put_token("<unk>", 0);
  put_token("\n<s>\n", 0);
  put_token("\n</s>\n", 0);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    put_token(name, 0);
  }
  for (const auto& [piece, score] : pieces) put_token(piece, score);
  return out;
}

const std::vector<std::pair<std::string, float>> kPieces = {
    {" ", 0}, {"a", 0}, {"b", 0}, {"c", 0}, {"ab", -1}, {"bc", 0}, {" a", -2}, {"abc", -3}, {"\xC3\xA9", 0}, {"aa", -0.5f}};
constexpr int kSpace = 259, kA = 260, kAb = 263, kBc = 264, kSpaceA = 265, kEAcute = 267, kAa = 268;
constexpr int kVocab = 259 + 10;

Tokenizer small_tokenizer() { return Tokenizer::parse(tokenizer_file(kPieces), kVocab); }

int byte_token(unsigned char b) { return Tokenizer::kFirstByteToken + b; }

TEST(Tokenizer, MergesTheHighestScoringPairFirst) {
  const Tokenizer t = small_tokenizer();
  // " a b c": bc (0) beats ab (-1); then " a" (-2) beats abc (-3).
  EXPECT_EQ(t.encode("abc"), (std::vector<int>{Tokenizer::kBos, kSpaceA, kBc}));
  EXPECT_EQ(t.encode("ab", false), (std::vector<int>{kSpace, kAb}));
}

TEST(Tokenizer, BreaksTiesLeftmost) {
  const Tokenizer t = small_tokenizer();
  // Two equal "aa" pairs: the left one merges, so " a" can no longer form.
  EXPECT_EQ(t.encode("aaa", false), (std::vector<int>{kSpace, kAa, kA}));
}

TEST(Tokenizer, FallsBackToBytes) {
  const Tokenizer t = small_tokenizer();
  EXPECT_EQ(t.encode("x", false), (std::vector<int>{kSpace, byte_token('x')}));
  EXPECT_EQ(t.encode("\xC3\xA9", false), (std::vector<int>{kSpace, kEAcute}));  // in the vocabulary
  EXPECT_EQ(t.encode("\xC3\xBC", false), (std::vector<int>{kSpace, byte_token(0xC3), byte_token(0xBC)}));
  const std::string emoji = "\xF0\x9F\x98\x80";
  EXPECT_EQ(t.encode(emoji, false),
            (std::vector<int>{kSpace, byte_token(0xF0), byte_token(0x9F), byte_token(0x98), byte_token(0x80)}));
}

TEST(Tokenizer, EmptyTextHasNoDummyPrefix) {
  const Tokenizer t = small_tokenizer();
  EXPECT_EQ(t.encode(""), std::vector<int>{Tokenizer::kBos});
  EXPECT_EQ(t.encode("", true, true), (std::vector<int>{Tokenizer::kBos, Tokenizer::kEos}));
  EXPECT_TRUE(t.encode("", false).empty());
}

TEST(Tokenizer, DecodeInvertsEncode) {
  const Tokenizer t = small_tokenizer();
  for (const std::string text : {"abc", "aaa bc", "x\xC3\xBCy\xC3\xA9", "\xF0\x9F\x98\x80 a", " leading"}) {
    EXPECT_EQ(t.decode(t.encode(text)), text);
  }
  EXPECT_EQ(t.decode(Tokenizer::kBos, kSpaceA), "a");
  EXPECT_EQ(t.decode(kA, kSpaceA), " a");
  EXPECT_EQ(t.decode(kA, byte_token('x')), "x");
  EXPECT_THROW((void)t.decode(kA, kVocab), lowbit::Error);
}

TEST(Tokenizer, RefusesMalformedFiles) {
  const auto file = tokenizer_file(kPieces);
  EXPECT_THROW((void)Tokenizer::parse(std::span(file).first(file.size() - 1), kVocab), lowbit::Error);
  EXPECT_THROW((void)Tokenizer::parse(std::span(file).first(2), kVocab), lowbit::Error);
  EXPECT_THROW((void)Tokenizer::parse(file, kVocab + 1), lowbit::Error);  // runs past the end
  EXPECT_THROW((void)Tokenizer::parse(file, kVocab - 1), lowbit::Error);  // trailing bytes
  EXPECT_THROW((void)Tokenizer::parse(file, 100), lowbit::Error);         // no room for byte tokens
  EXPECT_THROW((void)Tokenizer::parse(tokenizer_file(kPieces, 2), kVocab), lowbit::Error);  // piece > max length
  auto negative = file;
  const std::int32_t bad = -5;
  std::memcpy(negative.data() + 4 + 4, &bad, 4);  // length of token 0
  try {
    (void)Tokenizer::parse(negative, kVocab, "tok");
    ADD_FAILURE() << "a negative length was accepted";
  } catch (const lowbit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("token 0 has length -5"), std::string::npos) << e.what();
  }
}

TEST(TokenizerOnModel, FirstLineMatchesReferenceTokens) {
  const auto& m = test::real_model();
  const std::vector<int> expected = m.reference["first_line_tokens_128"].get<std::vector<int>>();
  std::vector<int> tokens = m.tokenizer.encode(m.lines.front());
  ASSERT_GE(tokens.size(), expected.size());
  tokens.resize(expected.size());
  EXPECT_EQ(tokens, expected);
}

TEST(TokenizerOnModel, EveryLineRoundTrips) {
  const auto& m = test::real_model();
  EXPECT_EQ(m.lines.size(), 19u);
  for (const std::string& line : m.lines) EXPECT_EQ(m.tokenizer.decode(m.tokenizer.encode(line)), line);
}

}  // namespace
}  // namespace llama2c
