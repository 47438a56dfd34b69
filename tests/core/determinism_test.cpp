// Determinism across the library: every quantizer and kernel gives bit-identical results
// for 1, 2 and 4 threads and when run again. The per-header tests already compare 1 and 2
// threads; this program adds 4 threads (more threads than this CI's cores, so OpenMP's
// static split differs again) and repeated runs in one process (no state leaks between
// calls: thread_local scratch, cached factorizations, ISA dispatch).
#include <gtest/gtest.h>

#include <functional>
#include <vector>

#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/kernels/gemv.hpp"
#include "lowbit/kernels/gemv_int8.hpp"
#include "lowbit/kernels/matmul.hpp"
#include "lowbit/quantizers/gptq.hpp"
#include "lowbit/quantizers/hqq.hpp"
#include "lowbit/quantizers/omniquant.hpp"
#include "lowbit/quantizers/qllm.hpp"
#include "lowbit/quantizers/rtn.hpp"
#include "test_util.hpp"

namespace lowbit {
namespace {

// Thread counts of each run: three counts, then the first and last again (repeats).
constexpr int kRuns[] = {1, 2, 4, 4, 1};

// Results of `run` under each thread count of kRuns, the caller's count restored.
template <class Result>
std::vector<Result> under_thread_counts(const std::function<Result()>& run) {
  const int saved = num_threads();
  std::vector<Result> results;
  for (int threads : kRuns) {
    set_num_threads(threads);
    results.push_back(run());
  }
  set_num_threads(saved);
  return results;
}

// Every result equal to the first, bit for bit (Eigen's == compares exactly).
template <class Result, class Same>
void expect_all_identical(const std::vector<Result>& results, Same&& same) {
  for (std::size_t i = 1; i < results.size(); ++i)
    EXPECT_TRUE(same(results[0], results[i])) << "run " << i << " (" << kRuns[i] << " threads) differs from run 0 (1 thread)";
}

template <class Result>
void expect_all_identical(const std::vector<Result>& results) {
  expect_all_identical(results, [](const Result& a, const Result& b) { return a == b; });
}

bool same_layer(const QuantizedLayer<float>& a, const QuantizedLayer<float>& b, const Matrix<float>& X) {
  return a.weights == b.weights && a.channel_map == b.channel_map && a.input_transform.scale == b.input_transform.scale &&
         a.input_transform.shift == b.input_transform.shift && a.bias == b.bias && a.lowrank_a == b.lowrank_a &&
         a.lowrank_b == b.lowrank_b && a.history.loss == b.history.loss && a.forward(X) == b.forward(X);
}

// Large enough that every parallel loop of the kernels runs in parallel (rows x cols
// above the kernels' 2^16 work threshold), with a ragged last group.
const Matrix<float>& weights() {
  static const Matrix<float> W = test::random_matrix<float>(256, 552, 1, 0.02);
  return W;
}

TEST(Determinism, RtnAndHqqForEveryGroupAxis) {
  const Matrix<float> W = weights().topRows(64);  // 64 rows: every row loop splits over 4 threads
  for (GroupAxis axis : {GroupAxis::Input, GroupAxis::Output}) {
    const QuantSpec spec{.bits = 3, .group_size = 64, .group_axis = axis};
    const RTN<float> rtn(RTN<float>::Options{.spec = spec, .mse = true});
    expect_all_identical(under_thread_counts<QuantizedMatrix<float>>([&] { return rtn.quantize(W); }));
    const HQQ<float> hqq(HQQ<float>::Options{.spec = spec, .iters = 10, .variant = HqqVariant::Improved});
    expect_all_identical(under_thread_counts<QuantizedMatrix<float>>([&] { return hqq.quantize(W); }));
  }
}

TEST(Determinism, GptqFromCalibrationToWeights) {
  const Matrix<float> X = test::random_matrix<float>(600, 552, 2);
  // One quantizer object reused across runs too: its cached factorization must not change
  // the result of a later call.
  const Matrix<float> W = weights().topRows(64);
  GPTQ<float> reused(552, {.spec = {.bits = 4, .group_size = 32}, .act_order = true});
  reused.add_batch(X.topRows(300));
  reused.add_batch(X.bottomRows(300));
  const auto results = under_thread_counts<GPTQ<float>::Result>([&] {
    GPTQ<float> gptq(552, {.spec = {.bits = 4, .group_size = 32}, .act_order = true});
    gptq.add_batch(X.topRows(300));
    gptq.add_batch(X.bottomRows(300));
    EXPECT_TRUE(gptq.hessian() == reused.hessian());
    auto result = gptq.quantize_with_report(W);
    EXPECT_TRUE(reused.quantize(W) == result.weights);
    return result;
  });
  expect_all_identical(results, [](const auto& a, const auto& b) {
    return a.weights == b.weights && a.loss == b.loss && a.damp == b.damp;
  });
}

TEST(Determinism, OmniQuantAndQllmTraining) {
  const Matrix<float> X = test::random_matrix<float>(256, 128, 3);
  const Matrix<float> W = test::random_matrix<float>(48, 128, 4, 0.05);
  const OmniQuantOptions<float> omni_options{.weight = {.bits = 3, .group_size = 64},
                                             .activation = QuantSpec{.bits = 8, .group_size = 0},
                                             .epochs = 2, .batch_tokens = 128, .seed = 7};
  expect_all_identical(under_thread_counts<QuantizedLayer<float>>([&] {
                         OmniQuant<float> omni(omni_options);
                         omni.calibrate(X);
                         return omni.quantize(W);
                       }),
                       [&](const auto& a, const auto& b) { return same_layer(a, b, X); });
  const QLLMOptions<float> qllm_options{.extra_channel_ratios = {0.05}, .epochs = 1, .lr = 2e-3f, .batch_tokens = 128,
                                        .seed = 7};
  expect_all_identical(under_thread_counts<QuantizedLayer<float>>([&] {
                         QLLM<float> qllm(qllm_options);
                         qllm.calibrate(X);
                         return qllm.quantize(W);
                       }),
                       [&](const auto& a, const auto& b) { return same_layer(a, b, X); });
}

TEST(Determinism, KernelsAndDequantizeForEveryBitWidthAndAxis) {
  const Vector<float> x = test::random_matrix<float>(552, 1, 5);
  const Matrix<float> X = test::random_matrix<float>(24, 552, 6);
  for (int bits : {2, 3, 4, 8})
    for (GroupAxis axis : {GroupAxis::Input, GroupAxis::Output}) {
      SCOPED_TRACE(testing::Message() << bits << " bits, " << (axis == GroupAxis::Input ? "input" : "output") << " axis");
      auto W = RTN<float>(QuantSpec{.bits = bits, .group_size = 64, .group_axis = axis}).quantize(weights());
      if (axis == GroupAxis::Input && bits == 4) {  // act-order permutation: x is permuted first
        std::vector<std::int32_t> permutation(552);
        for (std::size_t i = 0; i < permutation.size(); ++i) permutation[i] = static_cast<std::int32_t>((i * 97) % 552);
        W.set_permutation(permutation);
      }
      expect_all_identical(under_thread_counts<Matrix<float>>([&] { return W.dequantize(); }));
      expect_all_identical(under_thread_counts<Vector<float>>([&] {
        Vector<float> y(W.rows());
        gemv(W, x, y);
        return y;
      }));
      expect_all_identical(under_thread_counts<Vector<float>>([&] {
        Vector<float> y(W.rows());
        gemv_int8(W, x, y);
        return y;
      }));
      expect_all_identical(under_thread_counts<Matrix<float>>([&] {
        Matrix<float> Y(X.rows(), W.rows());
        matmul(W, X, Y);
        return Y;
      }));
    }
}

}  // namespace
}  // namespace lowbit
