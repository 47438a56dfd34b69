// Thread safety of const objects: one shared QuantizedMatrix read by gemv, gemv_int8,
// matmul and dequantize from several std::threads at once, and one const RTN / HQQ
// quantizer used by several threads at once. Each thread compares its results with
// results computed beforehand on the main thread.
//
// Built with -DLOWBIT_SANITIZE=thread this is the ThreadSanitizer test. lowbit's own
// parallel loops are switched off (set_num_threads(1)) so that only the std::threads
// below run concurrently: the OpenMP runtime is not instrumented for TSan and would
// report its own synchronization as races. Build it with -DLOWBIT_USE_OPENMP=OFF too.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/kernels/gemv.hpp"
#include "lowbit/kernels/gemv_int8.hpp"
#include "lowbit/kernels/matmul.hpp"
#include "lowbit/quantizers/hqq.hpp"
#include "lowbit/quantizers/rtn.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

constexpr int kThreads = 4;
constexpr int kRounds = 3;

// Keeps lowbit's OpenMP loops on the calling thread for the test's duration.
class SerialLibrary {
 public:
  SerialLibrary() : saved_(num_threads()) { set_num_threads(1); }
  ~SerialLibrary() { set_num_threads(saved_); }
  SerialLibrary(const SerialLibrary&) = delete;
  SerialLibrary& operator=(const SerialLibrary&) = delete;

 private:
  int saved_;
};

// Runs body(thread_index) on kThreads std::threads started together; returns how many
// of them reported a mismatch.
template <class Body>
int run_concurrently(Body&& body) {
  std::atomic<int> ready{0}, mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();  // start together
      if (!body(t)) mismatches.fetch_add(1);
    });
  for (auto& thread : threads) thread.join();
  return mismatches.load();
}

TEST(Concurrency, ConstQuantizedMatrixSharedByKernelsAndDequantize) {
  const SerialLibrary serial;
  for (GroupAxis axis : {GroupAxis::Input, GroupAxis::Output}) {
    SCOPED_TRACE(axis == GroupAxis::Input ? "input axis" : "output axis");
    const QuantizedMatrix<float> W =
        RTN<float>(QuantSpec{.bits = 4, .group_size = 64, .group_axis = axis}).quantize(test::random_matrix<float>(96, 300, 1));
    const Matrix<float> X = test::random_matrix<float>(kThreads * 3, 300, 2);  // three tokens per thread
    // Expected results, computed before any thread starts.
    const Matrix<float> W_hat = W.dequantize();
    Matrix<float> gemv_expected(kThreads, 96), int8_expected(kThreads, 96), matmul_expected(X.rows(), 96);
    for (int t = 0; t < kThreads; ++t) {
      Vector<float> y(96);
      gemv(W, X.row(t).transpose(), y);
      gemv_expected.row(t) = y.transpose();
      gemv_int8(W, X.row(t).transpose(), y);
      int8_expected.row(t) = y.transpose();
    }
    matmul(W, X, matmul_expected);

    const int mismatches = run_concurrently([&](int t) {
      bool same = true;
      for (int round = 0; round < kRounds; ++round) {
        Vector<float> y(96);
        gemv(W, X.row(t).transpose(), y);
        same = same && y.transpose() == gemv_expected.row(t);
        gemv_int8(W, X.row(t).transpose(), y);
        same = same && y.transpose() == int8_expected.row(t);
        Matrix<float> Y(3, 96);
        matmul(W, X.middleRows(3 * t, 3), Y);
        same = same && Y == matmul_expected.middleRows(3 * t, 3);
        same = same && W.dequantize() == W_hat;
      }
      return same;
    });
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(Concurrency, ConstQuantizerSharedByThreads) {
  const SerialLibrary serial;
  std::vector<Matrix<float>> inputs;
  for (int t = 0; t < kThreads; ++t) inputs.push_back(test::random_matrix<float>(16, 160, 10 + t));
  const RTN<float> rtn(RTN<float>::Options{.spec = {.bits = 3, .group_size = 32}, .mse = true});
  const HQQ<float> hqq(HQQ<float>::Options{.spec = {.bits = 3, .group_size = 32}, .iters = 5,
                                           .variant = HqqVariant::Improved});
  std::vector<QuantizedMatrix<float>> rtn_expected, hqq_expected;
  for (const auto& W : inputs) {
    rtn_expected.push_back(rtn.quantize(W));
    hqq_expected.push_back(hqq.quantize(W));
  }
  // Each thread quantizes its own matrix and then everyone's: the same inputs are read
  // by several threads at once.
  const int mismatches = run_concurrently([&](int t) {
    bool same = true;
    for (int k = 0; k < kThreads; ++k) {
      const int i = (t + k) % kThreads;
      same = same && rtn.quantize(inputs[static_cast<std::size_t>(i)]) == rtn_expected[static_cast<std::size_t>(i)];
      same = same && hqq.quantize(inputs[static_cast<std::size_t>(i)]) == hqq_expected[static_cast<std::size_t>(i)];
    }
    return same;
  });
  EXPECT_EQ(mismatches, 0);
}

}  // namespace
}  // namespace lowbit
