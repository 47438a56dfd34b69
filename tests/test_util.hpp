// Shared helpers for the test programs: fixture loading, random data, error metrics.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <iterator>
#include <stdexcept>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "lowbit/core/types.hpp"

namespace lowbit::test {

inline std::string data_path(const std::string& name) { return std::string(LOWBIT_TEST_DATA) + "/" + name; }

template <class T>
std::vector<T> read_binary(const std::string& name) {
  std::ifstream in(data_path(name), std::ios::binary);
  if (!in) throw std::runtime_error("cannot open test data " + name);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<T> values(bytes.size() / sizeof(T));
  std::memcpy(values.data(), bytes.data(), values.size() * sizeof(T));
  return values;
}

// A raw little-endian float32 fixture as a [rows, cols] matrix.
inline Matrix<float> load_fixture(const std::string& name, Index rows, Index cols) {
  const auto values = read_binary<float>(name);
  if (static_cast<Index>(values.size()) != rows * cols) throw std::runtime_error("bad fixture size " + name);
  return Eigen::Map<const Matrix<float>>(values.data(), rows, cols);
}

struct FixtureLayer {
  Matrix<float> W, X, Xeval;
};

// The fixture layer of ../shared/fixtures (copied to tests/data), loaded once.
inline const FixtureLayer& fixture_layer() {
  static const FixtureLayer layer{load_fixture("W_512x1024.f32", 512, 1024), load_fixture("X_2048x1024.f32", 2048, 1024),
                                  load_fixture("Xeval_512x1024.f32", 512, 1024)};
  return layer;
}

// ||W - W_hat||_F / ||W||_F, in double.
template <class A, class B>
double rel_fro(const A& W, const B& W_hat) {
  return (W.template cast<double>() - W_hat.template cast<double>()).norm() / W.template cast<double>().norm();
}

// ||X (W - W_hat)^T||_F / ||X W^T||_F. Products in float (relative error ~1e-6 for
// these sizes, far below any tolerance the tests use), norms in double.
template <class A, class B, class C>
double out_rel(const A& X, const B& W, const C& W_hat) {
  const Matrix<float> Xf = X.template cast<float>();
  const Matrix<float> diff = (W.template cast<double>() - W_hat.template cast<double>()).template cast<float>();
  const Matrix<float> error = Xf * diff.transpose();
  const Matrix<float> reference = Xf * W.template cast<float>().transpose();
  return error.template cast<double>().norm() / reference.template cast<double>().norm();
}

template <class T>
Matrix<T> random_matrix(Index rows, Index cols, std::uint64_t seed, double stddev = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, stddev);
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(dist(rng));
  return m;
}

inline std::vector<std::uint8_t> random_codes(Index n, int bits, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(n));
  for (auto& c : codes) c = static_cast<std::uint8_t>(rng() & ((1u << bits) - 1u));
  return codes;
}

}  // namespace lowbit::test
