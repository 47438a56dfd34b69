// Evaluation text: lines of a story file, each encoded on its own with BOS and cut to
// the model's seq_len, split into calibration lines (the first ones) and held-out lines
// (the rest, never seen by a quantizer).
#pragma once

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "llama2c/checkpoint.hpp"
#include "llama2c/tokenizer.hpp"

namespace llama2c {

using Sequence = std::vector<int>;

// The non-empty lines of a text file ('\n' separated, a trailing '\r' dropped).
[[nodiscard]] inline std::vector<std::string> read_lines(const std::filesystem::path& path) {
  const std::vector<std::byte> bytes = read_file_bytes(path);
  std::vector<std::string> lines;
  std::string line;
  const auto flush = [&] {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) lines.push_back(line);
    line.clear();
  };
  for (std::byte b : bytes) {
    if (b == std::byte{'\n'}) flush();
    else line.push_back(static_cast<char>(b));
  }
  flush();
  return lines;
}

// Each line as BOS + its tokens, at most `max_tokens` long.
[[nodiscard]] inline std::vector<Sequence> encode_lines(const Tokenizer& tokenizer, const std::vector<std::string>& lines,
                                                        int max_tokens) {
  std::vector<Sequence> sequences;
  for (const std::string& line : lines) {
    Sequence tokens = tokenizer.encode(line, /*bos=*/true);
    if (static_cast<int>(tokens.size()) > max_tokens) tokens.resize(static_cast<std::size_t>(max_tokens));
    sequences.push_back(std::move(tokens));
  }
  return sequences;
}

struct TextSplit {
  std::vector<std::string> calibration, held_out;
  std::size_t dropped = 0;  // held-out lines left out as repeats (see split_lines)
};

// The first `calibration_lines` lines calibrate; the others are held out. A held-out
// line equal to an earlier line up to letter case is dropped: the text repeats some
// stories, and a repeat of a calibration line would leak it into the evaluation.
[[nodiscard]] inline TextSplit split_lines(const std::vector<std::string>& lines, std::size_t calibration_lines) {
  check(calibration_lines < lines.size(), "split_lines: ", calibration_lines, " calibration lines leave none of the ",
        lines.size(), " lines held out");
  const auto folded = [](std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    return s;
  };
  TextSplit split;
  std::set<std::string> seen;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const bool repeat = !seen.insert(folded(lines[i])).second;
    if (i < calibration_lines) split.calibration.push_back(lines[i]);
    else if (repeat) ++split.dropped;
    else split.held_out.push_back(lines[i]);
  }
  return split;
}

}  // namespace llama2c
