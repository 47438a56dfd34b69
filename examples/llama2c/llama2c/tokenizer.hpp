// The llama2.c byte-pair tokenizer.
//
// File (tok512.bin and its kin): int32 max_token_length, then per token float32 score,
// int32 byte length, the bytes. The token count is the model's vocab_size.
//
// Encoding: BOS (1) first when asked; a dummy space token before non-empty text; each
// UTF-8 character mapped to its token, or to byte tokens (id = byte + 3) when the
// vocabulary lacks it; then the adjacent pair whose concatenation is a token with the
// highest score is merged, leftmost on ties, until no pair is a token.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "llama2c/checkpoint.hpp"

namespace llama2c {

class Tokenizer {
 public:
  static constexpr int kBos = 1;
  static constexpr int kEos = 2;
  static constexpr int kFirstByteToken = 3;  // tokens 3..258 are the bytes <0x00>..<0xFF>

  Tokenizer() = default;

  // Parses a tokenizer file held in memory with `vocab_size` tokens.
  static Tokenizer parse(std::span<const std::byte> bytes, int vocab_size, const std::string& name = "tokenizer") {
    check(vocab_size > kFirstByteToken + 255, name, ": vocab_size = ", vocab_size,
          " cannot hold the 256 byte tokens after <unk>, BOS, EOS");
    detail::ByteReader in(bytes, name);
    Tokenizer t;
    t.max_token_length_ = in.read<std::int32_t>("max_token_length");
    check(t.max_token_length_ > 0, name, ": max_token_length = ", t.max_token_length_, " is not positive");
    t.pieces_.reserve(static_cast<std::size_t>(vocab_size));
    t.scores_.reserve(static_cast<std::size_t>(vocab_size));
    for (int id = 0; id < vocab_size; ++id) {
      const std::string what = "token " + std::to_string(id);
      const float score = in.read<float>(what.c_str());
      check(std::isfinite(score), name, ": ", what, " has score ", score);
      const auto length = in.read<std::int32_t>(what.c_str());
      check(length >= 0 && length <= t.max_token_length_, name, ": ", what, " has length ", length,
            " outside 0..max_token_length ", t.max_token_length_);
      std::string piece(static_cast<std::size_t>(length), '\0');
      for (auto& ch : piece) ch = static_cast<char>(in.read<std::uint8_t>(what.c_str()));
      t.ids_.emplace(piece, id);  // a repeated piece keeps its first id
      t.pieces_.push_back(std::move(piece));
      t.scores_.push_back(score);
    }
    check(in.offset() == in.size(), name, ": ", in.size() - in.offset(), " trailing bytes after ", vocab_size,
          " tokens");
    return t;
  }

  static Tokenizer load(const std::filesystem::path& path, int vocab_size) {
    const std::vector<std::byte> bytes = read_file_bytes(path);
    return parse(bytes, vocab_size, path.string());
  }

  [[nodiscard]] int size() const { return static_cast<int>(pieces_.size()); }
  [[nodiscard]] const std::string& piece(int id) const { return pieces_.at(static_cast<std::size_t>(id)); }
  [[nodiscard]] float score(int id) const { return scores_.at(static_cast<std::size_t>(id)); }

  // Id of an exact piece, or -1.
  [[nodiscard]] int find(std::string_view piece) const {
    const auto it = ids_.find(std::string(piece));
    return it == ids_.end() ? -1 : it->second;
  }

  [[nodiscard]] std::vector<int> encode(std::string_view text, bool bos = true, bool eos = false) const {
    check(!pieces_.empty(), "Tokenizer::encode: the tokenizer is empty");
    std::vector<int> tokens;
    if (bos) tokens.push_back(kBos);
    const std::size_t first = tokens.size();
    if (!text.empty()) {
      const int space = find(" ");
      check(space >= 0, "Tokenizer::encode: the vocabulary has no ' ' token for the dummy prefix");
      tokens.push_back(space);
    }
    append_characters(text, tokens);
    merge_pairs(tokens, first);
    if (eos) tokens.push_back(kEos);
    return tokens;
  }

  // The text of `token` following `previous`: the leading space after BOS is dropped and
  // byte tokens become their byte.
  [[nodiscard]] std::string decode(int previous, int token) const {
    check(token >= 0 && token < size(), "Tokenizer::decode: token ", token, " is outside 0..", size() - 1);
    std::string_view piece = pieces_[static_cast<std::size_t>(token)];
    if (previous == kBos && !piece.empty() && piece.front() == ' ') piece.remove_prefix(1);
    if (token >= kFirstByteToken && token < kFirstByteToken + 256 && piece.size() == 6 && piece.starts_with("<0x"))
      return std::string(1, static_cast<char>(token - kFirstByteToken));
    return std::string(piece);
  }

  [[nodiscard]] std::string decode(std::span<const int> tokens) const {
    std::string text;
    int previous = -1;
    for (int token : tokens) {
      if (token != kBos && token != kEos) text += decode(previous, token);
      previous = token;
    }
    return text;
  }

 private:
  // One token per UTF-8 character (a lead byte and up to 3 continuation bytes), or its
  // bytes as byte tokens when the vocabulary lacks it.
  void append_characters(std::string_view text, std::vector<int>& tokens) const {
    std::size_t i = 0;
    while (i < text.size()) {
      std::size_t end = i + 1;
      while (end < text.size() && end - i < 4 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) ++end;
      const int id = find(text.substr(i, end - i));
      if (id >= 0) {
        tokens.push_back(id);
      } else {
        for (std::size_t b = i; b < end; ++b) tokens.push_back(kFirstByteToken + static_cast<unsigned char>(text[b]));
      }
      i = end;
    }
  }

  // Greedy merging from tokens[first] on. Each adjacent pair's merge candidate is cached
  // and only the two pairs next to a merge are looked up again, so a line of n
  // characters costs O(n^2) score comparisons but only O(n) string lookups.
  void merge_pairs(std::vector<int>& tokens, std::size_t first) const {
    struct Candidate {
      int id = -1;  // token of the concatenation, -1: not a token
      float score = 0;
    };
    const auto candidate = [&](int left, int right) {
      const int id = find(pieces_[static_cast<std::size_t>(left)] + pieces_[static_cast<std::size_t>(right)]);
      return id < 0 ? Candidate{} : Candidate{id, scores_[static_cast<std::size_t>(id)]};
    };
    std::vector<int> seq(tokens.begin() + static_cast<std::ptrdiff_t>(first), tokens.end());
    std::vector<Candidate> pairs;  // pairs[i]: seq[i] + seq[i + 1]
    for (std::size_t i = 0; i + 1 < seq.size(); ++i) pairs.push_back(candidate(seq[i], seq[i + 1]));
    for (;;) {
      std::ptrdiff_t best = -1;
      for (std::size_t i = 0; i < pairs.size(); ++i)
        if (pairs[i].id >= 0 && (best < 0 || pairs[i].score > pairs[static_cast<std::size_t>(best)].score))
          best = static_cast<std::ptrdiff_t>(i);
      if (best < 0) break;
      const auto b = static_cast<std::size_t>(best);
      seq[b] = pairs[b].id;
      seq.erase(seq.begin() + best + 1);
      pairs.erase(pairs.begin() + best);
      if (b > 0) pairs[b - 1] = candidate(seq[b - 1], seq[b]);
      if (b < pairs.size()) pairs[b] = candidate(seq[b], seq[b + 1]);
    }
    tokens.resize(first);
    tokens.insert(tokens.end(), seq.begin(), seq.end());
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;
  int max_token_length_ = 0;
};

}  // namespace llama2c
