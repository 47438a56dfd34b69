// lowbit's quantizers as whole-model Methods (quantize.hpp). OmniQuant and QLLM are
// offered when their headers are in this lowbit.
#pragma once

#include <lowbit/quantizers/gptq.hpp>
#include <lowbit/quantizers/hqq.hpp>
#include <lowbit/quantizers/rtn.hpp>

#if __has_include(<lowbit/quantizers/omniquant.hpp>)
#include <lowbit/quantizers/omniquant.hpp>
#endif
#if __has_include(<lowbit/quantizers/qllm.hpp>)
#include <lowbit/quantizers/qllm.hpp>
#endif

#include "llama2c/quantize.hpp"

namespace llama2c {

// Round-to-nearest, min-max range per group.
[[nodiscard]] inline Method rtn(lowbit::QuantSpec spec) {
  return {"RTN", false, [spec](const MatrixF& W, const MatrixF&) { return Linear(lowbit::RTN<float>(spec).quantize(W)); }};
}

// HQQ (calibration-free); options.spec is replaced by `spec`.
[[nodiscard]] inline Method hqq(lowbit::QuantSpec spec, lowbit::HQQ<float>::Options options = {}) {
  options.spec = spec;
  return {"HQQ", false, [options](const MatrixF& W, const MatrixF&) { return Linear(lowbit::HQQ<float>(options).quantize(W)); }};
}

// GPTQ on the layer's calibration inputs; options.spec is replaced by `spec`.
[[nodiscard]] inline Method gptq(lowbit::QuantSpec spec, lowbit::GPTQ<float>::Options options = {}) {
  options.spec = spec;
  return {"GPTQ", true, [options](const MatrixF& W, const MatrixF& X) {
            lowbit::GPTQ<float> gptq(W.cols(), options);
            gptq.add_batch(X);
            return Linear(gptq.quantize(W));
          }};
}

#if __has_include(<lowbit/quantizers/omniquant.hpp>)
// OmniQuant (weight-only unless options.activation is set) on the layer's calibration inputs; options.weight = `spec`.
[[nodiscard]] inline Method omniquant(lowbit::QuantSpec spec, lowbit::OmniQuant<float>::Options options = {}) {
  options.weight = spec;
  return {"OmniQuant", true, [options](const MatrixF& W, const MatrixF& X) {
            lowbit::OmniQuant<float> omni(options);
            omni.calibrate(X);
            return Linear(omni.quantize(W));
          }};
}
#endif

#if __has_include(<lowbit/quantizers/qllm.hpp>)
// QLLM's options without activation quantization (its default is W4A4), so that its
// row compares with the other weight-only methods.
[[nodiscard]] inline lowbit::QLLM<float>::Options qllm_weight_only() {
  lowbit::QLLM<float>::Options options;
  options.activation.reset();
  return options;
}

// QLLM on the layer's calibration inputs; options.weight = `spec`.
[[nodiscard]] inline Method qllm(lowbit::QuantSpec spec, lowbit::QLLM<float>::Options options = qllm_weight_only()) {
  options.weight = spec;
  return {"QLLM", true, [options](const MatrixF& W, const MatrixF& X) {
            lowbit::QLLM<float> method(options);
            method.calibrate(X);
            return Linear(method.quantize(W));
          }};
}
#endif

}  // namespace llama2c
