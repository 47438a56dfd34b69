// Whole-model quantization: the calibration capture is true-sequential (each group of
// projections sees the inputs the already-quantized model produces), and on the real
// model a few properties of the evaluation hold on a subset of the held-out text.
#include "llama2c/quantize.hpp"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "llama2c/methods.hpp"
#include "llama2c/metrics.hpp"
#include "test_model.hpp"

namespace llama2c {
namespace {

// RTN, but declared calibrated so that the driver captures inputs for it.
Method calibrated_rtn(lowbit::QuantSpec spec) {
  Method m = rtn(spec);
  m.calibrated = true;
  return m;
}

struct Capture {
  std::vector<std::pair<int, std::string>> order;
  std::map<std::pair<int, std::string>, MatrixF> inputs;
};

InputObserver record(Capture& capture) {
  return [&capture](int layer, std::string_view name, const MatrixF& X) {
    capture.order.emplace_back(layer, std::string(name));
    capture.inputs[{layer, std::string(name)}] = X;
  };
}

MatrixF stacked(const std::vector<MatrixF>& parts) { return detail::stack_rows(parts); }

TEST(Quantize, CaptureIsTrueSequential) {
  const Weights w = test::random_weights(test::small_config(), 21);
  const auto calibration = test::random_sequences(2, 24, w.config.vocab_size, 22);
  Capture capture;
  const QuantizedModel q = quantize_model(w, calibrated_rtn({.bits = 2, .group_size = 16}), calibration, record(capture));

  const std::vector<std::string> group_order{"wq", "wk", "wv", "wo", "w1", "w3", "w2"};
  ASSERT_EQ(capture.order.size(), 2 * group_order.size());
  for (std::size_t i = 0; i < capture.order.size(); ++i) {
    EXPECT_EQ(capture.order[i].first, static_cast<int>(i / group_order.size()));
    EXPECT_EQ(capture.order[i].second, group_order[i % group_order.size()]);
  }

  // Replay the quantized model stage by stage: every captured batch is what the
  // quantized layers before it produce.
  const Transformer& model = q.model;
  const Transformer float_model(w);
  std::vector<MatrixF> h, h_float;
  for (const auto& s : calibration) h.push_back(model.embed(s));
  h_float = h;
  for (int l = 0; l < w.config.n_layers; ++l) {
    const Layer& layer = model.layers()[static_cast<std::size_t>(l)];
    std::vector<MatrixF> attn_in, mixed, ffn_in, hidden;
    for (auto& x : h) attn_in.push_back(stages::rmsnorm(x, layer.rms_att));
    for (const char* name : {"wq", "wk", "wv"}) EXPECT_EQ(capture.inputs.at({l, name}), stacked(attn_in)) << l << name;
    for (auto& x : attn_in) mixed.push_back(stages::attention_mix(w.config, model.rope(), layer, x));
    EXPECT_EQ(capture.inputs.at({l, "wo"}), stacked(mixed)) << l;
    for (std::size_t i = 0; i < h.size(); ++i) h[i] += layer.wo(mixed[i]);
    for (auto& x : h) ffn_in.push_back(stages::rmsnorm(x, layer.rms_ffn));
    for (const char* name : {"w1", "w3"}) EXPECT_EQ(capture.inputs.at({l, name}), stacked(ffn_in)) << l << name;
    for (auto& x : ffn_in) hidden.push_back(stages::ffn_hidden(layer, x));
    EXPECT_EQ(capture.inputs.at({l, "w2"}), stacked(hidden)) << l;
    for (std::size_t i = 0; i < h.size(); ++i) h[i] += layer.w2(hidden[i]);
    // The float model's stream has drifted away: the capture did not come from it.
    for (auto& x : h_float) stages::decoder_layer(w.config, float_model.rope(), float_model.layers()[static_cast<std::size_t>(l)], x);
    EXPECT_GT((stacked(h) - stacked(h_float)).norm(), 1e-3 * stacked(h_float).norm()) << l;
  }
}

TEST(Quantize, CalibrationFreeMethodsNeverRunTheModel) {
  const Weights w = test::random_weights(test::small_config(), 23);
  Capture capture;
  const QuantizedModel q = quantize_model(w, rtn({.bits = 4, .group_size = 32}), {}, record(capture));
  EXPECT_TRUE(capture.order.empty());
  for (const Layer& layer : q.model.layers())
    layer.for_each_linear([](const char* name, const Linear& l) { EXPECT_TRUE(l.quantized()) << name; });
  // 4-bit codes plus a float scale and zero per 32 weights (hidden 44 pads to 64 codes).
  const double bits = 8.0 * static_cast<double>(q.model.linear_bytes()) / static_cast<double>(q.model.linear_weights());
  EXPECT_GT(bits, 4.0 + 64.0 / 32.0);
  EXPECT_LT(bits, 8.0);
  EXPECT_EQ(Transformer(w).linear_bytes(), static_cast<std::size_t>(Transformer(w).linear_weights()) * 4);
}

TEST(Quantize, RefusesCalibratedMethodWithoutText) {
  const Weights w = test::random_weights(test::small_config(), 24);
  EXPECT_THROW((void)quantize_model(w, gptq({.bits = 4, .group_size = 32}), {}), lowbit::Error);
  EXPECT_THROW((void)quantize_model(w, Method{"empty", false, {}}, {}), lowbit::Error);
}

// The quantized model's decode (lowbit::gemv per token) and prefill (lowbit::matmul per
// sequence) agree.
TEST(Quantize, QuantizedDecodeMatchesPrefill) {
  const Weights w = test::random_weights(test::small_config(), 25);
  const auto sequences = test::random_sequences(1, 32, w.config.vocab_size, 26);
  const QuantizedModel q = quantize_model(w, gptq({.bits = 4, .group_size = 32}, {.act_order = true}), sequences);
  const MatrixF prefill = q.model.forward(sequences[0]);
  auto session = q.model.session();
  for (std::size_t t = 0; t < sequences[0].size(); ++t) {
    const VectorF& logits = session.step(sequences[0][t]);
    EXPECT_LT((logits.transpose() - prefill.row(static_cast<Index>(t))).cwiseAbs().maxCoeff(), 1e-3f) << t;
  }
}

// The real model, calibrated on the first 6 lines (cut to 256 tokens), scored on the
// first 128 tokens of each held-out line: the evaluation of llama2c_eval, made small
// enough for a test.
struct Subset {
  std::vector<Sequence> calibration, held_out;
  std::vector<MatrixF> float_logits;
};

const Subset& subset() {
  static const Subset s = [] {
    const auto& m = test::real_model();
    const TextSplit split = split_lines(m.lines, 6);
    Subset out;
    out.calibration = encode_lines(m.tokenizer, split.calibration, 256);
    out.held_out = encode_lines(m.tokenizer, split.held_out, 128);
    out.float_logits = reference_logits(Transformer(m.weights), out.held_out);
    return out;
  }();
  return s;
}

Scores score(const Method& method) {
  const QuantizedModel q = quantize_model(test::real_model().weights, method, subset().calibration);
  return evaluate(q.model, subset().held_out, &subset().float_logits);
}

TEST(QuantizeOnModel, EightBitWeightsKeepTheDistribution) {
  const Scores s = score(rtn({.bits = 8, .group_size = 64}));
  EXPECT_LT(s.mean_kl(), 1e-3);
  EXPECT_GT(s.top1(), 0.97);
}

TEST(QuantizeOnModel, FourBitsBeatTwoBits) {
  const Scores four = score(rtn({.bits = 4, .group_size = 64})), two = score(rtn({.bits = 2, .group_size = 64}));
  EXPECT_LT(four.perplexity(), two.perplexity());
  EXPECT_LT(four.mean_kl(), two.mean_kl());
  EXPECT_GT(four.top1(), two.top1());
}

// The headline ordering at 3 bits, group size 32: GPTQ calibrated on real text,
// and HQQ without calibration, both beat round-to-nearest on held-out text.
TEST(QuantizeOnModel, GptqAndHqqBeatRtnAtThreeBits) {
  const lowbit::QuantSpec spec{.bits = 3, .group_size = 32};
  const double rtn_ppl = score(rtn(spec)).perplexity();
  EXPECT_LT(score(gptq(spec, {.act_order = true})).perplexity(), rtn_ppl);
  EXPECT_LT(score(hqq(spec)).perplexity(), rtn_ppl);
}

TEST(QuantizeOnModel, QuantizedDecodeMatchesPrefill) {
  const auto& m = test::real_model();
  const QuantizedModel q = quantize_model(m.weights, hqq({.bits = 4, .group_size = 64}), {});
  const Sequence& tokens = subset().held_out[0];
  const Index n = 40;
  const MatrixF prefill = q.model.forward(std::span(tokens).first(n));
  auto session = q.model.session();
  for (Index t = 0; t < n; ++t) {
    const VectorF& logits = session.step(tokens[static_cast<std::size_t>(t)]);
    EXPECT_LT((logits.transpose() - prefill.row(t)).cwiseAbs().maxCoeff(), 1e-3f) << t;
  }
}

}  // namespace
}  // namespace llama2c
