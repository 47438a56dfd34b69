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

// out_rel_eval of the first row whose keys all equal those of `match`.
inline double reference_out_rel_eval(const nlohmann::json& match) {
  const auto rows = reference_rows([&](const nlohmann::json& row) {
    for (const auto& [key, value] : match.items())
      if (!row.contains(key) || row[key] != value) return false;
    return true;
  });
  if (rows.empty()) throw std::runtime_error("no reference row for " + match.dump());
  return rows.front()["out_rel_eval"].get<double>();
}

// Optimized builds train on the whole fixture layer; sanitizer builds (asserts on, far
// slower) on a slice: 64 outputs x 256 inputs, 512 calibration / 256 held-out tokens.
#ifdef NDEBUG
inline constexpr bool kFullFixture = true;
#else
inline constexpr bool kFullFixture = false;
#endif

inline const FixtureLayer& affordable_fixture() {
  static const FixtureLayer layer = [] {
    const FixtureLayer& full = fixture_layer();
    if (kFullFixture) return full;
    return FixtureLayer{full.W.topLeftCorner(64, 256), full.X.topLeftCorner(512, 256),
                        full.Xeval.topLeftCorner(256, 256)};
  }();
  return layer;
}

// |a - b| / |b|
inline double relative_difference(double a, double b) { return std::abs(a - b) / std::abs(b); }

}  // namespace lowbit::test
