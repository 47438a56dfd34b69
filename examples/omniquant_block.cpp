// Block-wise OmniQuant on a two-layer MLP block, y = down(gelu(up(x))).
//
// The caller writes the block's float and quantized forward and backward once, in terms
// of a Pass (lowbit::OmniQuantBlock::Pass); lowbit owns the learnable clipping and
// transform parameters, the fake quantizers with straight-through gradients, and AdamW.
// Then the example compares the block's held-out output error for three ways of
// quantizing it to 3 bits (groups of 128): RTN per layer, OmniQuant layer by layer, and
// OmniQuant trained on the whole block.
//
//   omniquant_block [data_dir]     (default: the repository's tests/data fixture)
//
// up is the fixture's W_512x1024; down is a random heavy-tailed 1024 x 512 matrix; the
// tokens are the fixture's X_2048x1024 (calibration) and Xeval_512x1024 (held out).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>

#include <lowbit/lowbit.hpp>
#include <lowbit/quantizers/omniquant.hpp>

namespace {

using lowbit::Index;
using lowbit::Matrix;
using lowbit::Vector;

Matrix<float> load(const std::string& dir, const std::string& name, Index rows, Index cols) {
  std::ifstream in(dir + "/" + name, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + dir + "/" + name);
  Matrix<float> m(rows, cols);
  in.read(reinterpret_cast<char*>(m.data()), static_cast<std::streamsize>(sizeof(float) * m.size()));
  if (!in) throw std::runtime_error(name + " is shorter than " + std::to_string(rows) + "x" + std::to_string(cols));
  return m;
}

// gelu, tanh form, and its derivative.
float gelu(float x) { return 0.5f * x * (1 + std::tanh(0.7978845608f * (x + 0.044715f * x * x * x))); }
float gelu_grad(float x) {
  const float t = std::tanh(0.7978845608f * (x + 0.044715f * x * x * x));
  return 0.5f * (1 + t) + 0.5f * x * (1 - t * t) * 0.7978845608f * (1 + 3 * 0.044715f * x * x);
}

struct Mlp {
  Matrix<float> W_up, W_down;
  Vector<float> b_up, b_down;
};

Matrix<float> linear(const Matrix<float>& X, const Matrix<float>& W, const Vector<float>& b) {
  Matrix<float> Y = X * W.transpose();
  Y.rowwise() += b.transpose();
  return Y;
}

Matrix<float> float_block(const Mlp& m, const Matrix<float>& X) {
  return linear(linear(X, m.W_up, m.b_up).unaryExpr(&gelu), m.W_down, m.b_down);
}

Matrix<float> quantized_block(const lowbit::QuantizedLayer<float>& up, const lowbit::QuantizedLayer<float>& down,
                              const Matrix<float>& X) {
  return down.forward(up.forward(X).unaryExpr(&gelu));
}

double relative_error(const Matrix<float>& got, const Matrix<float>& want) {
  return (got - want).cast<double>().norm() / want.cast<double>().norm();
}

}  // namespace

int main(int argc, char** argv) try {
  const std::string dir = argc > 1 ? argv[1] : LOWBIT_FIXTURE_DIR;
  const Matrix<float> X = load(dir, "X_2048x1024.f32", 2048, 1024);
  const Matrix<float> X_eval = load(dir, "Xeval_512x1024.f32", 512, 1024);
  Mlp m{load(dir, "W_512x1024.f32", 512, 1024), Matrix<float>(1024, 512), Vector<float>::Constant(512, 0.05f),
        Vector<float>::Zero(1024)};
  std::mt19937_64 rng(7);
  std::student_t_distribution<float> heavy(5.0f);
  for (Index i = 0; i < m.W_down.size(); ++i) m.W_down.data()[i] = 0.02f * heavy(rng);

  const lowbit::QuantSpec spec{.bits = 3, .group_size = 128};
  const Matrix<float> Y_eval = float_block(m, X_eval);

  // 1. RTN, each layer on its own.
  lowbit::QuantizedLayer<float> rtn_up, rtn_down;
  rtn_up.weights = lowbit::RTN<float>(spec).quantize(m.W_up);
  rtn_up.bias = m.b_up;
  rtn_down.weights = lowbit::RTN<float>(spec).quantize(m.W_down);
  rtn_down.bias = m.b_down;

  // 2. OmniQuant layer by layer, each on its own float input.
  const lowbit::OmniQuantOptions<float> options{.weight = spec, .epochs = 5, .batch_tokens = 256};
  lowbit::OmniQuant<float> omni_up(options), omni_down(options);
  omni_up.calibrate(X);
  omni_down.calibrate(linear(X, m.W_up, m.b_up).unaryExpr(&gelu));
  const auto layer_up = omni_up.quantize(m.W_up, m.b_up);
  const auto layer_down = omni_down.quantize(m.W_down, m.b_down);

  // 3. OmniQuant on the block's output error. The float target does not change during
  //    training, so it is computed once and picked by token.
  lowbit::OmniQuantOptions<float> block_options = options;
  block_options.progress = [](int epoch, double loss) { std::printf("  epoch %2d  block loss %.5g\n", epoch, loss); };
  lowbit::OmniQuantBlock<float> block(block_options);
  const Index up = block.add_layer(m.W_up, m.b_up);
  const Index down = block.add_layer(m.W_down, m.b_down);
  const Matrix<float> Y_float = float_block(m, X);
  const auto start = std::chrono::steady_clock::now();
  block.train(X, [&](lowbit::OmniQuantBlock<float>::Pass& pass) {
    const Matrix<float> U = pass.forward(up, pass.input());        // quantized up projection
    const Matrix<float> Y = pass.forward(down, U.unaryExpr(&gelu));  // quantized down projection
    Matrix<float> E = Y;                                           // E = Y_hat - Y_float
    for (std::size_t k = 0; k < pass.tokens().size(); ++k)
      E.row(static_cast<Index>(k)) -= Y_float.row(pass.tokens()[k]);
    const Matrix<float> grad_A = pass.backward(down, 2 * E);       // d||E||^2 / d gelu(U)
    pass.backward(up, grad_A.cwiseProduct(U.unaryExpr(&gelu_grad)), /*input_gradient=*/false);
    return E.squaredNorm() / static_cast<double>(E.size());       // what history() reports
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::printf("\nheld-out relative output error of the block (W3A16g128):\n");
  std::printf("  RTN per layer          %.4f\n", relative_error(quantized_block(rtn_up, rtn_down, X_eval), Y_eval));
  std::printf("  OmniQuant layer-wise   %.4f\n", relative_error(quantized_block(layer_up, layer_down, X_eval), Y_eval));
  std::printf("  OmniQuant block-wise   %.4f   (%.1f s training)\n",
              relative_error(quantized_block(block.layer(up), block.layer(down), X_eval), Y_eval), seconds);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "omniquant_block: %s\n", e.what());
  return 1;
}
