// Reads the reference figures of tests/data/reference_small.jsonl (one JSON object per
// configuration, see tests/data/FIXTURES.md).
#pragma once

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace lowbit::test {

// Every row for which `keep` returns true.
inline std::vector<nlohmann::json> reference_rows(const std::function<bool(const nlohmann::json&)>& keep) {
  std::ifstream in(data_path("reference_small.jsonl"));
  if (!in) throw std::runtime_error("cannot open reference_small.jsonl");
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) {
      auto row = nlohmann::json::parse(line);
      if (keep(row)) rows.push_back(std::move(row));
    }
  return rows;
}

// |a - b| / |b|
inline double relative_difference(double a, double b) { return std::abs(a - b) / std::abs(b); }

}  // namespace lowbit::test
