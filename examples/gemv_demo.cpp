// Quantize a layer with RTN, save it to a lowbit safetensors file and load it back, then
// multiply straight from the loaded packed weights: y = W x with lowbit::gemv (and the
// int8-activation lowbit::gemv_int8), Y = X W^T with lowbit::matmul, each compared with
// the float result and timed against Eigen.
//
//   gemv_demo [bits] [group_size]          (defaults: 4 64)
//   gemv_demo --load FILE NAME             a matrix of a lowbit file (lowbit-quantize's
//                                          output), against its dequantized float form
//
// Uses the fixture layer of tests/data (W [512, 1024], held-out tokens Xeval) when it
// is there, a random layer otherwise.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "lowbit/io/lowbit_format.hpp"
#include "lowbit/io/safetensors.hpp"
#include "lowbit/kernels/gemv_int8.hpp"
#include "lowbit/kernels/matmul.hpp"
#include "lowbit/quantizers/rtn.hpp"

namespace {

using lowbit::Index;
using lowbit::Matrix;
using lowbit::Vector;

// A raw float32 [rows, cols] file, or a random matrix when it cannot be read.
Matrix<float> load_or_random(const std::string& path, Index rows, Index cols) {
  Matrix<float> m(rows, cols);
  std::ifstream in(path, std::ios::binary);
  if (in.read(reinterpret_cast<char*>(m.data()), static_cast<std::streamsize>(sizeof(float) * m.size()))) return m;
  std::printf("(%s not found: using random data)\n", path.c_str());
  return Matrix<float>::Random(rows, cols) * 0.02f;
}

// Median wall time of `runs` calls, in microseconds.
template <class Fn>
double median_us(Fn&& fn, int runs = 51) {
  std::vector<double> times;
  for (int i = 0; i < runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(times.begin(), times.begin() + runs / 2, times.end());
  return times[static_cast<std::size_t>(runs / 2)];
}

double rel_error(const Matrix<float>& a, const Matrix<float>& reference) {
  return (a.cast<double>() - reference.cast<double>()).norm() / reference.cast<double>().norm();
}

// W through a file: saved by lowbit_format::save, loaded by lowbit_format::load (the
// loaded matrix equals the saved one bit for bit).
lowbit::QuantizedMatrix<float> save_and_load(const lowbit::QuantizedMatrix<float>& q) {
  const std::string name = "lowbit_gemv_demo_" + std::to_string(std::random_device{}()) + ".safetensors";
  const std::string path = (std::filesystem::temp_directory_path() / name).string();
  lowbit::SafeTensorsWriter writer(path);
  lowbit::lowbit_format::save(writer, "W", q);
  writer.commit();
  auto loaded = lowbit::lowbit_format::load<float>(lowbit::SafeTensors::open(path), "W");
  std::filesystem::remove(path);
  if (!(loaded == q)) throw lowbit::Error("gemv_demo: the loaded matrix differs from the saved one");
  std::printf("saved to and loaded from %s (%.1f KiB)\n", path.c_str(), static_cast<double>(q.packed_bytes()) / 1024);
  return loaded;
}

// y = W x and Y = X W^T from the packed weights, against Eigen on the float matrix W.
void run(const lowbit::QuantizedMatrix<float>& q, const Matrix<float>& W, const Matrix<float>& X) {
  std::printf("W %ldx%ld, %d-bit, group %ld: %.2f bits per weight, ISA %s, %d threads\n", W.rows(), W.cols(),
              q.spec().bits, q.spec().group_size, q.bits_per_weight(),
              std::string(lowbit::isa_name(lowbit::active_isa())).c_str(), lowbit::num_threads());

  // One token: y = W x.
  const Vector<float> x = X.row(0).transpose();
  Vector<float> y_float(W.rows()), y(W.rows()), y_int8(W.rows());
  const double t_float = median_us([&] { y_float.noalias() = W * x; });
  const double t_gemv = median_us([&] { lowbit::gemv(q, x, y); });
  const double t_int8 = median_us([&] { lowbit::gemv_int8(q, x, y_int8); });
  std::printf("gemv      rel. error vs float %.4f   %8.1f us (Eigen float %.1f us, %.1fx)\n", rel_error(y, y_float),
              t_gemv, t_float, t_float / t_gemv);
  std::printf("gemv_int8 rel. error vs float %.4f   %8.1f us (%.1fx)\n", rel_error(y_int8, y_float), t_int8,
              t_float / t_int8);

  // All tokens: Y = X W^T.
  Matrix<float> Y_float(X.rows(), W.rows()), Y(X.rows(), W.rows());
  const double t_gemm = median_us([&] { Y_float.noalias() = X * W.transpose(); }, 5);
  const double t_matmul = median_us([&] { lowbit::matmul(q, X, Y); }, 5);
  std::printf("matmul    rel. error vs float %.4f   %8.1f us for %ld tokens (Eigen float %.1f us, %.2fx)\n",
              rel_error(Y, Y_float), t_matmul, X.rows(), t_gemm, t_gemm / t_matmul);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc > 1 && std::string(argv[1]) == "--load") {
      if (argc != 4) {
        std::fprintf(stderr, "usage: gemv_demo --load FILE NAME\n");
        return 2;
      }
      const auto q = lowbit::lowbit_format::load<float>(lowbit::SafeTensors::open(argv[2]), argv[3]);
      const Matrix<float> W = q.dequantize();  // the float reference: the dequantized weights
      run(q, W, Matrix<float>::Random(64, W.cols()));
      return 0;
    }
    const int bits = argc > 1 ? std::atoi(argv[1]) : 4;
    const Index group_size = argc > 2 ? std::atoll(argv[2]) : 64;
    const std::string dir = LOWBIT_FIXTURE_DIR;
    const Matrix<float> W = load_or_random(dir + "/W_512x1024.f32", 512, 1024);
    const Matrix<float> X = load_or_random(dir + "/Xeval_512x1024.f32", 512, 1024);
    const auto q = save_and_load(lowbit::RTN<float>(lowbit::QuantSpec{.bits = bits, .group_size = group_size}).quantize(W));
    run(q, W, X);
  } catch (const lowbit::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
