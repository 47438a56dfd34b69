// quantize_layer: quantizes one realistic LLM layer with every method lowbit has and
// prints weight error, output error on held-out activations, size and time.
//
//   quantize_layer [FIXTURE_DIR]
//
// FIXTURE_DIR holds W_512x1024.f32, X_2048x1024.f32 (calibration) and
// Xeval_512x1024.f32 (held out); it defaults to the copy in tests/data.
#include <lowbit/lowbit.hpp>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <optional>
#include <memory>
#include <string>
#include <vector>

namespace {

using lowbit::Index;
using lowbit::Matrix;

Matrix<float> load_f32(const std::string& path, Index rows, Index cols) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw lowbit::Error("cannot open " + path);
  Matrix<float> m(rows, cols);
  in.read(reinterpret_cast<char*>(m.data()), static_cast<std::streamsize>(m.size() * sizeof(float)));
  if (in.gcount() != static_cast<std::streamsize>(m.size() * sizeof(float))) throw lowbit::Error(path + " is too short");
  return m;
}

struct Layer {
  Matrix<float> W, X, Xeval, Y_eval;  // Y_eval = Xeval W^T, the float output
};

// What a method hands back: the packed weights, and the layer output on any input
// (W_hat applied plainly, or through the method's own input transform).
struct Outcome {
  lowbit::QuantizedMatrix<float> weights;
  std::function<Matrix<float>(const Matrix<float>&)> forward;
  bool transformed_input = false;  // weights live in transformed coordinates: no weight error
};

struct Method {
  std::string name;
  lowbit::QuantSpec spec;
  std::function<Outcome(const Layer&, const lowbit::QuantSpec&)> run;
};

Outcome plain(lowbit::QuantizedMatrix<float> q) {
  auto W_hat = std::make_shared<Matrix<float>>(q.dequantize());
  return {std::move(q), [W_hat](const Matrix<float>& X) -> Matrix<float> { return X * W_hat->transpose(); }};
}

void print_row(const Method& method, const Layer& layer) {
  const auto start = std::chrono::steady_clock::now();
  Outcome outcome = method.run(layer, method.spec);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const Matrix<float> W_hat = outcome.weights.dequantize();
  const double weight_error = (layer.W - W_hat).norm() / layer.W.norm();
  char weight_column[16] = "           -";
  if (!outcome.transformed_input) std::snprintf(weight_column, sizeof weight_column, "%12.4f", weight_error);
  const double output_error = (layer.Y_eval - outcome.forward(layer.Xeval)).norm() / layer.Y_eval.norm();
  const std::string group = method.spec.group_size == 0 ? "row" : std::to_string(method.spec.group_size);
  std::printf("%-22s %4d %6s %s %12.4f %10zu %8.3f %10.1f\n", method.name.c_str(), method.spec.bits,
              group.c_str(), weight_column, output_error, outcome.weights.packed_bytes(),
              outcome.weights.bits_per_weight(), seconds * 1e3);
}

std::vector<Method> methods() {
  std::vector<Method> list;
  // fp16 scales and zeros, as checkpoints store them.
  const auto half = lowbit::ParamType::Float16;
  const std::vector<lowbit::QuantSpec> specs = {
      {.bits = 4, .group_size = 64, .param_type = half},  {.bits = 4, .group_size = 128, .param_type = half},
      {.bits = 3, .group_size = 64, .param_type = half},  {.bits = 3, .group_size = 128, .param_type = half},
      {.bits = 2, .group_size = 32, .param_type = half},  {.bits = 2, .group_size = 64, .param_type = half}};
  for (const auto& spec : specs) {
    list.push_back({"rtn", spec, [](const Layer& l, const lowbit::QuantSpec& s) {
                      return plain(lowbit::RTN<float>(s).quantize(l.W));
                    }});
    list.push_back({"rtn (mse clip)", spec, [](const Layer& l, const lowbit::QuantSpec& s) {
                      return plain(lowbit::RTN<float>({.spec = s, .mse = true}).quantize(l.W));
                    }});
    list.push_back({"hqq", spec, [](const Layer& l, const lowbit::QuantSpec& s) {
                      return plain(lowbit::HQQ<float>({.spec = s}).quantize(l.W));
                    }});
    list.push_back({"hqq (improved)", spec, [](const Layer& l, const lowbit::QuantSpec& s) {
                      return plain(lowbit::HQQ<float>({.spec = s, .variant = lowbit::HqqVariant::Improved}).quantize(l.W));
                    }});
  }
  // GPTQ on 2048 calibration tokens, act-order on (groups stay contiguous: the matrix
  // stores its input permutation), with min-max and with HQQ's improved group fit.
  auto gptq = [](typename lowbit::GPTQ<float>::GroupFit fit) {
    return [fit](const Layer& l, const lowbit::QuantSpec& s) {
      lowbit::GPTQ<float> quantizer(l.W.cols(), {.spec = s, .act_order = true, .group_fit = fit});
      quantizer.add_batch(l.X);
      return plain(quantizer.quantize(l.W));
    };
  };
  const auto hqq_fit = lowbit::GPTQ<float>::hqq_fit({.variant = lowbit::HqqVariant::Improved});
  for (const auto& spec : specs) {
    list.push_back({"gptq (act-order)", spec, gptq({})});
    list.push_back({"gptq + hqq fit", spec, gptq(hqq_fit)});
  }
  // Calibrated methods that may change the input: scored through the layer's forward().
  auto calibrated = [](auto make_quantizer) {
    return [make_quantizer](const Layer& l, const lowbit::QuantSpec& s) {
      auto quantizer = make_quantizer(s);
      quantizer.calibrate(l.X);
      auto layer = std::make_shared<lowbit::QuantizedLayer<float>>(quantizer.quantize(l.W));
      return Outcome{layer->weights, [layer](const Matrix<float>& X) { return layer->forward(X); }, true};
    };
  };
  auto omniquant = [&](std::optional<lowbit::QuantSpec> activation, int epochs) {
    return calibrated([activation, epochs](const lowbit::QuantSpec& s) {
      return lowbit::OmniQuant<float>({.weight = s, .activation = activation, .epochs = epochs});
    });
  };
  list.push_back({"omniquant", {.bits = 4, .group_size = 128, .param_type = half}, omniquant(std::nullopt, 20)});
  list.push_back({"omniquant", {.bits = 3, .group_size = 128, .param_type = half}, omniquant(std::nullopt, 20)});
  list.push_back({"omniquant", {.bits = 2, .group_size = 64, .param_type = half}, omniquant(std::nullopt, 40)});
  const lowbit::QuantSpec a4{.bits = 4, .group_size = 0}, a6{.bits = 6, .group_size = 0};
  // Per-channel weights with per-token activations, scored with plain min-max RTN.
  auto rtn_with_activation = [](lowbit::QuantSpec activation) {
    return [activation](const Layer& l, const lowbit::QuantSpec& s) {
      auto layer = std::make_shared<lowbit::QuantizedLayer<float>>();
      layer->weights = lowbit::RTN<float>(s).quantize(l.W);
      layer->activation = activation;
      return Outcome{layer->weights, [layer](const Matrix<float>& X) { return layer->forward(X); }};
    };
  };
  auto qllm = [&](lowbit::QuantSpec activation) {
    return calibrated([activation](const lowbit::QuantSpec& s) {
      return lowbit::QLLM<float>({.weight = s, .activation = activation});
    });
  };
  const lowbit::QuantSpec a8{.bits = 8, .group_size = 0};
  const lowbit::QuantSpec per_channel4{.bits = 4, .group_size = 0, .param_type = half};
  list.push_back({"rtn W4A4 (per-channel)", per_channel4, rtn_with_activation(a4)});
  list.push_back({"qllm W4A4", per_channel4, qllm(a4)});
  list.push_back({"rtn W4A8 (per-channel)", per_channel4, rtn_with_activation(a8)});
  list.push_back({"qllm W4A8", per_channel4, qllm(a8)});
  list.push_back({"omniquant W4A4", {.bits = 4, .group_size = 0, .param_type = half}, omniquant(a4, 20)});
  list.push_back({"omniquant W6A6", {.bits = 6, .group_size = 0, .param_type = half}, omniquant(a6, 20)});
  return list;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string dir = argc > 1 ? argv[1] : LOWBIT_FIXTURE_DIR;
    Layer layer;
    layer.W = load_f32(dir + "/W_512x1024.f32", 512, 1024);
    layer.X = load_f32(dir + "/X_2048x1024.f32", 2048, 1024);
    layer.Xeval = load_f32(dir + "/Xeval_512x1024.f32", 512, 1024);
    layer.Y_eval = layer.Xeval * layer.W.transpose();
    std::printf("layer W [512 x 1024] (fp32 %zu bytes), %lld calibration tokens, %lld held-out tokens, "
                "%d threads, ISA %s\n\n",
                static_cast<std::size_t>(layer.W.size() * 4), static_cast<long long>(layer.X.rows()),
                static_cast<long long>(layer.Xeval.rows()), lowbit::num_threads(),
                std::string(lowbit::isa_name(lowbit::active_isa())).c_str());
    std::printf("%-22s %4s %6s %12s %12s %10s %8s %10s\n", "method", "bits", "group", "weight err", "output err",
                "bytes", "bits/w", "time ms");
    for (const Method& method : methods()) print_row(method, layer);
    std::printf("\nweight err = ||W - W_hat||_F / ||W||_F; output err = ||Y - Y_hat||_F / ||Y||_F on the held-out "
                "tokens; bytes = codes + scales + zeros (+ permutation); '-': the method transforms the layer input, so its "
                "packed weights are not comparable with W (side parameters of such layers are not counted).\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quantize_layer: %s\n", e.what());
    return 1;
  }
  return 0;
}
