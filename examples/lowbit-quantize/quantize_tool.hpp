// lowbit-quantize: quantizes the linear-layer weights of a safetensors model and writes
// them in lowbit's own format, HQQ's or AutoGPTQ's (v1), copying every other tensor.
//
// The output is planned in full (every tensor's name, dtype and shape) before any work,
// so bad arguments, unsupported shapes and name clashes fail in a second; tensors are
// then quantized one at a time and streamed into a temporary file that only appears
// under the output name once complete. Peak memory is about one tensor in float (plus
// its calibration inputs) beyond the memory-mapped input.
#pragma once

#include <CLI/CLI.hpp>
#include <fnmatch.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "lowbit/core/quantized_matrix.hpp"
#include "lowbit/core/threading.hpp"
#include "lowbit/io/checkpoint.hpp"
#include "lowbit/io/gptq_format.hpp"
#include "lowbit/io/hqq_format.hpp"
#include "lowbit/io/lowbit_format.hpp"
#include "lowbit/io/safetensors.hpp"
#include "lowbit/quantizers/rtn.hpp"
#include "lowbit/version.hpp"

#include "lowbit/quantizers/hqq.hpp"
#include "lowbit/quantizers/gptq.hpp"
#include "lowbit/quantizers/omniquant.hpp"

namespace lowbit::tool {

struct Options {
  std::string input, output;
  std::string method = "rtn";    // rtn | hqq | gptq | omniquant | qllm
  int bits = 4;
  Index group_size = 64;
  std::string format = "lowbit";  // lowbit | hqq | gptq
  std::string calibration;         // safetensors: tensor <weight name> = X [tokens, in]
  std::vector<std::string> include, exclude;
  std::string param_type = "f16";  // scales/zeros storage: f16 | f32
  bool symmetric = false;
  bool act_order = false;          // gptq: process columns by descending Hessian diagonal
  int threads = 0;                 // 0: every core
  bool dry_run = false;
};

[[nodiscard]] inline bool method_needs_calibration(const std::string& method) {
  return method == "gptq" || method == "omniquant" || method == "qllm";
}

namespace detail {

[[nodiscard]] inline bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
[[nodiscard]] inline bool starts_with(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

// The layer a weight belongs to: "a.b.q_proj.weight" -> "a.b.q_proj".
[[nodiscard]] inline std::string module_of(const std::string& name) {
  return ends_with(name, ".weight") ? name.substr(0, name.size() - 7) : name;
}

// Default selection: linear-layer weights by their usual names (q/k/v/o/gate/up/down
// _proj, out_proj, fc1/fc2, dense*, query_key_value, MoE w1/w2/w3).
[[nodiscard]] inline bool default_selected(const std::string& name) {
  if (!ends_with(name, ".weight")) return false;
  const std::string module = module_of(name);
  const auto dot = module.rfind('.');
  const std::string_view last = dot == std::string::npos ? std::string_view(module) : std::string_view(module).substr(dot + 1);
  return ends_with(std::string(last), "proj") || starts_with(last, "fc") || starts_with(last, "dense") ||
         last == "query_key_value" || last == "w1" || last == "w2" || last == "w3";
}

[[nodiscard]] inline bool glob_match(const std::string& pattern, const std::string& name) {
  return ::fnmatch(pattern.c_str(), name.c_str(), 0) == 0;
}

[[nodiscard]] inline std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (bytes >= 1000 && u < 4) { bytes /= 1000; ++u; }
  std::ostringstream s;
  s << std::fixed << std::setprecision(u == 0 ? 0 : 1) << bytes << " " << units[u];
  return s.str();
}

[[nodiscard]] inline std::string clock_text(double seconds) {
  const auto total = static_cast<long>(std::max(0.0, seconds) + 0.5);
  std::ostringstream s;
  s << total / 60 << ":" << std::setw(2) << std::setfill('0') << total % 60;
  return s.str();
}

// An error message as one line, without the library's "lowbit: " prefix.
[[nodiscard]] inline std::string one_line(std::string text) {
  if (text.rfind("lowbit: ", 0) == 0) text.erase(0, 8);
  for (char& c : text)
    if (c == '\n' || c == '\r') c = ' ';
  return text;
}

inline volatile std::sig_atomic_t interrupted = 0;
extern "C" inline void on_interrupt(int) { interrupted = 1; }

// SIGINT/SIGTERM set a flag checked between tensors, so the temporary file is removed
// on the way out; the previous handlers come back on destruction.
class InterruptGuard {
 public:
  InterruptGuard() {
    interrupted = 0;
    struct sigaction action {};
    action.sa_handler = on_interrupt;
    sigemptyset(&action.sa_mask);
    ::sigaction(SIGINT, &action, &old_int_);
    ::sigaction(SIGTERM, &action, &old_term_);
  }
  ~InterruptGuard() {
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }
  InterruptGuard(const InterruptGuard&) = delete;
  InterruptGuard& operator=(const InterruptGuard&) = delete;

 private:
  struct sigaction old_int_ {}, old_term_ {};
};

// A progress bar on a terminal: tensors done, bytes done, time left.
class Progress {
 public:
  Progress(std::ostream& out, bool enabled, std::size_t tensors, std::uint64_t bytes)
      : out_(out), enabled_(enabled), tensors_(tensors), bytes_(std::max<std::uint64_t>(bytes, 1)) {}

  void show(std::size_t done, std::uint64_t bytes_done, const std::string& current) {
    if (!enabled_) return;
    const double fraction = static_cast<double>(bytes_done) / static_cast<double>(bytes_);
    const double elapsed = seconds();
    const int width = 24, filled = static_cast<int>(fraction * width);
    out_ << "\r\033[K[" << std::string(static_cast<std::size_t>(filled), '#') << std::string(static_cast<std::size_t>(width - filled), '.')
         << "] " << done << "/" << tensors_ << " tensors  " << human_bytes(static_cast<double>(bytes_done)) << "/"
         << human_bytes(static_cast<double>(bytes_)) << "  " << clock_text(elapsed);
    if (fraction > 0.01) out_ << " elapsed, ~" << clock_text(elapsed * (1 - fraction) / fraction) << " left";
    out_ << "  " << current.substr(0, 40) << std::flush;
    shown_ = true;
  }
  void clear() {
    if (enabled_ && shown_) out_ << "\r\033[K" << std::flush;
    shown_ = false;
  }
  [[nodiscard]] double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::ostream& out_;
  bool enabled_, shown_ = false;
  std::size_t tensors_;
  std::uint64_t bytes_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

enum class Format { Lowbit, Hqq, Gptq };

[[nodiscard]] inline Format parse_format(const std::string& name) {
  if (name == "lowbit") return Format::Lowbit;
  if (name == "hqq") return Format::Hqq;
  if (name == "gptq") return Format::Gptq;
  lowbit::detail::fail("--format ", name, " is not one of lowbit, hqq, gptq");
}

// One tensor's part of the plan.
struct Item {
  std::string name;        // input tensor
  bool quantize = false;
  Index rows = 0, cols = 0;
  std::vector<TensorDecl> outputs;
  std::uint64_t output_bytes = 0;
};

[[nodiscard]] inline std::uint64_t decl_bytes(const TensorDecl& d) {
  return *lowbit::detail::checked_bytes(d.shape, dtype_size(d.dtype));
}

// Re-encodes groups whose integral zero is 0 (no negative weight) with zero 1 and the
// range [0, max] over 2^b - 2 steps, so the GPTQ v1 layout (zero - 1 >= 0) can hold
// them. Returns how many groups changed. Rare in trained weights.
inline Index lift_zero_groups(QuantizedMatrix<float>& q, const Matrix<float>& W) {
  if (q.spec().symmetric || q.transposed()) return 0;
  const auto& perm = q.permutation();
  const Index length = q.group_length(), stored_cols = q.stored_cols();
  const int max_code = q.spec().max_code();
  auto scales = q.mutable_scales();
  auto zeros = q.mutable_zeros();
  Index lifted = 0;
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(stored_cols));
  for (Index r = 0; r < q.stored_rows(); ++r) {
    bool changed = false;
    q.stored_row_codes(r, codes.data());
    for (Index g = 0; g < q.groups_per_row(); ++g) {
      if (zeros(r, g) != 0.0f) continue;
      const Index begin = g * length, end = std::min(stored_cols, begin + length);
      float hi = 0;
      for (Index j = begin; j < end; ++j) hi = std::max(hi, W(r, perm.empty() ? j : perm[static_cast<std::size_t>(j)]));
      const float scale = round_param(hi > 0 ? hi / static_cast<float>(max_code - 1) : 1.0f, q.spec().param_type);
      scales(r, g) = scale;
      zeros(r, g) = 1.0f;
      for (Index j = begin; j < end; ++j)
        codes[static_cast<std::size_t>(j)] =
            lowbit::detail::encode(W(r, perm.empty() ? j : perm[static_cast<std::size_t>(j)]), scale, 1.0f, max_code);
      changed = true;
      ++lifted;
    }
    if (changed) q.set_stored_row(r, codes.data());
  }
  return lifted;
}

// ||W - W_hat||_F / ||W||_F, decoded one stored row at a time (no full copy).
[[nodiscard]] inline double relative_error(const QuantizedMatrix<float>& q, const Matrix<float>& W) {
  std::vector<double> error(static_cast<std::size_t>(q.stored_rows())), norm(error.size());
  const auto& perm = q.permutation();
  lowbit::detail::parallel_for(q.stored_rows(), [&](Index s) {
    thread_local std::vector<float> row;
    row.resize(static_cast<std::size_t>(q.stored_cols()));
    q.dequantize_stored_row(s, row.data());
    double e = 0, n = 0;
    for (Index j = 0; j < q.stored_cols(); ++j) {
      const double w = q.transposed() ? W(j, s) : W(s, perm.empty() ? j : perm[static_cast<std::size_t>(j)]);
      const double d = w - row[static_cast<std::size_t>(j)];
      e += d * d;
      n += w * w;
    }
    error[static_cast<std::size_t>(s)] = e;
    norm[static_cast<std::size_t>(s)] = n;
  });
  double e = 0, n = 0;
  for (std::size_t i = 0; i < error.size(); ++i) { e += error[i]; n += norm[i]; }
  return n > 0 ? std::sqrt(e / n) : (e > 0 ? INFINITY : 0.0);
}

}  // namespace detail

// The whole job. Returns the process exit code; messages go to `out` (table, summary)
// and `err` (progress bar, the one-line error).
inline int run(const Options& options, std::ostream& out, std::ostream& err, bool progress_bar) {
  using namespace lowbit::tool::detail;
  std::optional<SafeTensorsWriter> writer;
  std::optional<AtomicFile> config_file;
  try {
    const Options& o = options;
    // ---- arguments
    lowbit::detail::require(!o.input.empty(), "no input given");
    lowbit::detail::require(o.dry_run || !o.output.empty(), "no output given (-o FILE)");
    const Format format = parse_format(o.format);
    const std::string methods[] = {"rtn", "hqq", "gptq", "omniquant", "qllm"};
    lowbit::detail::require(std::find(std::begin(methods), std::end(methods), o.method) != std::end(methods), "--method ", o.method,
                            " is not one of rtn, hqq, gptq, omniquant, qllm");
    lowbit::detail::require(o.method != "qllm", "--method qllm is not supported by lowbit-quantize: QLLM reassembles the layer's input "
                                                "channels, which the weight-only output formats cannot hold (use lowbit::QLLM)");
    lowbit::detail::require(o.bits >= 1 && o.bits <= 8, "--bits ", o.bits, " is outside 1..8");
    lowbit::detail::require(o.group_size >= 0, "--group-size ", o.group_size, " is negative (0: one group per row)");
    lowbit::detail::require(o.param_type == "f16" || o.param_type == "f32", "--param-type ", o.param_type, " is not f16 or f32");
    lowbit::detail::require(o.threads >= 0, "--threads ", o.threads, " is negative");
    if (method_needs_calibration(o.method))
      lowbit::detail::require(!o.calibration.empty(), "--method ", o.method, " needs --calibration FILE (captured layer inputs)");
    else
      lowbit::detail::require(o.calibration.empty(), "--calibration is used by gptq, omniquant and qllm, not ", o.method);
    lowbit::detail::require(!o.act_order || o.method == "gptq", "--act-order is a gptq option, not ", o.method);
    lowbit::detail::require(!o.act_order || format != Format::Hqq, "--act-order permutes columns, which the hqq format cannot hold");
    if (o.threads > 0) set_num_threads(o.threads);

    QuantSpec spec;
    spec.bits = o.bits;
    spec.group_size = o.group_size;
    spec.symmetric = o.symmetric;
    spec.param_type = o.param_type == "f16" ? ParamType::Float16 : ParamType::Float32;
    if (format == Format::Gptq) {
      spec.integral_zero = true;  // v1 stores integer zeros
      lowbit::detail::require(spec.param_type == ParamType::Float16, "--format gptq stores fp16 scales: use --param-type f16");
    }
    spec.validate();

    // ---- input and plan
    const Checkpoint input = Checkpoint::open(o.input);
    std::optional<SafeTensors> calibration;
    if (!o.calibration.empty()) calibration = SafeTensors::open(o.calibration);
    if (!o.output.empty() && !o.dry_run) {
      FileId out_id;
      if (lowbit::detail::file_id(o.output, out_id))
        for (const auto& id : input.file_ids())
          lowbit::detail::require(!(id == out_id), "refusing to overwrite the input: output '", o.output, "' is an input file");
    }
    const bool permuted = o.act_order;  // act-order matrices carry a column permutation
    std::vector<Item> plan;
    std::uint64_t quantize_bytes = 0;
    std::size_t quantize_count = 0;
    for (const auto& name : input.names()) {
      const TensorInfo& info = input.info(name);
      Item item;
      item.name = name;
      const bool chosen = o.include.empty() ? default_selected(name)
                                            : std::any_of(o.include.begin(), o.include.end(), [&](const auto& g) { return glob_match(g, name); });
      const bool excluded = std::any_of(o.exclude.begin(), o.exclude.end(), [&](const auto& g) { return glob_match(g, name); });
      item.quantize = chosen && !excluded && info.rank() == 2 && is_float_dtype(info.dtype) && info.elements() > 0;
      if (chosen && !excluded && !item.quantize && !o.include.empty())
        lowbit::detail::fail("tensor '", name, "' matches --include but is ", dtype_name(info.dtype), " ",
                             lowbit::detail::shape_text(info.shape), "; only non-empty 2-D float tensors can be quantized");
      if (item.quantize) {
        item.rows = static_cast<Index>(info.shape[0]);
        item.cols = static_cast<Index>(info.shape[1]);
        const std::string module = module_of(name);
        try {
          switch (format) {
            case Format::Lowbit: item.outputs = lowbit_format::plan(module, item.rows, item.cols, spec, permuted); break;
            case Format::Hqq: item.outputs = hqq_format::plan(module, item.rows, item.cols, spec); break;
            case Format::Gptq: item.outputs = gptq_format::plan(module, item.rows, item.cols, spec); break;
          }
        } catch (const Error& e) {
          lowbit::detail::fail("tensor '", name, "' [", item.rows, ", ", item.cols, "]: ", e.what(), "; skip it with --exclude");
        }
        if (calibration) {
          const auto* x = calibration->find(name);
          lowbit::detail::require(x != nullptr, "--calibration '", o.calibration, "' has no inputs for '", name, "'");
          lowbit::detail::require(x->rank() == 2 && x->shape[1] == static_cast<std::uint64_t>(item.cols), "--calibration tensor '",
                                  name, "' is ", lowbit::detail::shape_text(x->shape), ", expected [tokens, ", item.cols, "]");
        }
        quantize_bytes += info.byte_size();
        ++quantize_count;
      } else {
        item.outputs = {TensorDecl{name, info.dtype, info.shape}};
      }
      for (const auto& d : item.outputs) item.output_bytes += decl_bytes(d);
      plan.push_back(std::move(item));
    }
    lowbit::detail::require(quantize_count > 0, "no tensor selected for quantization (default: 2-D weights named *proj, fc*, "
                                                "dense*; use --include GLOB)");

    const std::size_t name_width = std::min<std::size_t>(
        56, std::accumulate(plan.begin(), plan.end(), std::size_t{12}, [](std::size_t w, const Item& i) { return std::max(w, i.name.size()); }));
    auto shape_of = [](Index r, Index c) { return "[" + std::to_string(r) + ", " + std::to_string(c) + "]"; };

    if (o.dry_run) {
      std::uint64_t total = 0;
      out << std::left << std::setw(static_cast<int>(name_width)) << "tensor" << "  " << std::setw(14) << "shape" << "  "
          << std::setw(5) << "dtype" << "  " << std::setw(9) << "action" << "  output\n";
      for (const auto& item : plan) {
        const TensorInfo& info = input.info(item.name);
        out << std::left << std::setw(static_cast<int>(name_width)) << item.name << "  " << std::setw(14)
            << lowbit::detail::shape_text(info.shape) << "  " << std::setw(5) << dtype_name(info.dtype) << "  " << std::setw(9)
            << (item.quantize ? "quantize" : "copy") << "  " << human_bytes(static_cast<double>(item.output_bytes)) << "\n";
        total += item.output_bytes;
      }
      out << "dry run: would quantize " << quantize_count << " of " << plan.size() << " tensors (" << o.method << ", " << o.bits
          << "-bit, group " << o.group_size << ") into " << o.format << " format, about " << human_bytes(static_cast<double>(total))
          << "; nothing written\n";
      return 0;
    }

    // ---- declare the output
    writer.emplace(o.output);
    for (const auto& [key, value] : input.metadata()) writer->set_metadata(key, value);
    writer->set_metadata("format", "pt");
    writer->set_metadata("lowbit.quantize",
                         nlohmann::json{{"method", o.method}, {"bits", o.bits}, {"group_size", o.group_size}, {"format", o.format},
                                        {"param_type", o.param_type}, {"symmetric", o.symmetric}, {"version", LOWBIT_VERSION_STRING}}
                             .dump());
    for (const auto& item : plan) {
      if (item.quantize && format == Format::Lowbit)
        lowbit_format::declare(*writer, module_of(item.name), item.rows, item.cols, spec, permuted);
      else
        for (const auto& d : item.outputs) writer->declare(d);
    }
    if (format == Format::Gptq) {
      const auto slash = o.output.find_last_of('/');
      const std::string dir = slash == std::string::npos ? "." : o.output.substr(0, slash);
      std::string base = slash == std::string::npos ? o.output : o.output.substr(slash + 1);
      if (ends_with(base, ".safetensors")) base.resize(base.size() - 12);
      auto config = gptq_format::config_for(spec, permuted);
      config.model_file_base_name = base;
      const std::string text = config.to_json().dump(2) + "\n";
      config_file.emplace(dir + "/quantize_config.json");
      config_file->write_at(0, text.data(), text.size());
    }
    writer->start();

    // ---- work
    InterruptGuard guard;
    Progress progress(err, progress_bar, quantize_count, quantize_bytes);
    out << std::left << std::setw(static_cast<int>(name_width)) << "tensor" << "  " << std::setw(14) << "shape" << "  "
        << std::right << std::setw(9) << "rel err" << "  " << std::setw(6) << "bits/w" << "  " << std::setw(7) << "time" << "\n";
    std::size_t done = 0;
    std::uint64_t bytes_done = 0, output_quantized_bytes = 0, quantized_weights = 0;
    double error_sum = 0, error_max = 0;
    Index lifted_total = 0;
    for (const auto& item : plan) {
      if (interrupted) lowbit::detail::fail("interrupted");
      const SafeTensors& file = input.file_of(item.name);
      const TensorInfo& info = file.info(item.name);
      if (!item.quantize) {
        writer->write(item.name, file.bytes(info));
        continue;
      }
      progress.show(done, bytes_done, item.name);
      const auto start = std::chrono::steady_clock::now();
      const Matrix<float> W = file.matrix(item.name);
      lowbit::detail::require_finite(W, item.name.c_str());
      QuantizedMatrix<float> q;
      if (o.method == "rtn") {
        q = RTN<float>(spec).quantize(W);
      }
      else if (o.method == "hqq") {
        typename HQQ<float>::Options hqq_options;
        hqq_options.spec = spec;
        q = HQQ<float>(hqq_options).quantize(W);
      }
      else if (o.method == "gptq") {
        typename GPTQ<float>::Options gptq_options;
        gptq_options.spec = spec;
        gptq_options.act_order = o.act_order;
        GPTQ<float> gptq(item.cols, gptq_options);
        gptq.add_batch(calibration->matrix(item.name));
        q = gptq.quantize(W);
      }
      else if (o.method == "omniquant") {
        // Weight-only OmniQuant (learnable clipping, no activation transform), which the
        // weight-only output formats can hold.
        typename OmniQuant<float>::Options omni_options;
        omni_options.weight = spec;
        omni_options.let = false;
        OmniQuant<float> omni(omni_options);
        omni.calibrate(calibration->matrix(item.name));
        auto layer = omni.quantize(W);
        lowbit::detail::require(layer.input_transform.empty() && !layer.activation && layer.rank() == 0 && layer.bias.size() == 0,
                                "omniquant produced an input transform that the output formats cannot hold");
        q = std::move(layer.weights);
      }
      else {
        lowbit::detail::fail("--method ", o.method, " has no quantizer");  // unreachable: checked with the arguments
      }
      if (format == Format::Gptq) lifted_total += lift_zero_groups(q, W);
      if (permuted && q.permutation().empty()) {  // an identity order: store it explicitly, as declared
        std::vector<std::int32_t> identity(static_cast<std::size_t>(q.cols()));
        std::iota(identity.begin(), identity.end(), 0);
        q.set_permutation(std::move(identity));
      }
      const double error = relative_error(q, W);
      const std::string module = module_of(item.name);
      switch (format) {
        case Format::Lowbit: lowbit_format::write(*writer, module, q); break;
        case Format::Hqq: hqq_format::write(*writer, module, q, {.optimized = o.method == "hqq"}); break;
        case Format::Gptq: gptq_format::write(*writer, module, q); break;
      }
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double weights = static_cast<double>(item.rows) * static_cast<double>(item.cols);
      const double bits_per_weight = static_cast<double>(item.output_bytes) * 8.0 / weights;
      progress.clear();
      out << std::left << std::setw(static_cast<int>(name_width)) << item.name << "  " << std::setw(14) << shape_of(item.rows, item.cols)
          << "  " << std::right << std::setw(9) << std::setprecision(5) << std::fixed << error << "  " << std::setw(6)
          << std::setprecision(3) << bits_per_weight << "  " << std::setw(6) << std::setprecision(2) << seconds << "s" << std::endl;
      ++done;
      bytes_done += info.byte_size();
      output_quantized_bytes += item.output_bytes;
      quantized_weights += static_cast<std::uint64_t>(weights);
      error_sum += error;
      error_max = std::max(error_max, error);
    }
    progress.clear();
    if (interrupted) lowbit::detail::fail("interrupted");
    writer->commit();
    if (config_file) {
      try {
        config_file->commit();
      } catch (const std::exception&) {
        ::unlink(o.output.c_str());  // the model without its config is no output either
        throw;
      }
    }
    out << "quantized " << done << " tensors (" << quantized_weights << " weights, " << std::setprecision(3)
        << static_cast<double>(output_quantized_bytes) * 8.0 / static_cast<double>(quantized_weights) << " bits/weight), mean rel err "
        << std::setprecision(5) << error_sum / static_cast<double>(done) << ", max " << error_max << "; copied "
        << plan.size() - done << " tensors";
    if (lifted_total > 0) out << "; " << lifted_total << " groups re-encoded with zero 1 for the GPTQ layout";
    out << "\nwrote " << o.output << " (" << human_bytes(static_cast<double>(writer->file_bytes())) << ") in " << std::setprecision(1)
        << progress.seconds() << " s\n";
    return 0;
  } catch (const std::exception& e) {
    if (writer) writer->discard();
    if (config_file) config_file->discard();
    err << "lowbit-quantize: " << one_line(e.what()) << std::endl;
    return 1;
  }
}

// Command-line front end (CLI11): parses argv and calls run().
inline int main(int argc, char** argv, std::ostream& out = std::cout, std::ostream& err = std::cerr) {
  Options o;
  CLI::App app{"lowbit-quantize " LOWBIT_VERSION_STRING ": quantize the linear-layer weights of a safetensors model to 2/3/4/8 bits"};
  app.add_option("input", o.input, "model .safetensors file, or a directory with model.safetensors.index.json")->required();
  app.add_option("-o,--output", o.output, "output .safetensors file (written atomically)");
  app.add_option("--method", o.method, "rtn | hqq | gptq | omniquant | qllm")->capture_default_str();
  app.add_option("--bits", o.bits, "bits per weight, 1..8 (hqq/gptq formats: 2, 3, 4, 8)")->capture_default_str();
  app.add_option("--group-size", o.group_size, "weights per (scale, zero) group along the input; 0: one per row")->capture_default_str();
  app.add_option("--format", o.format, "output layout: lowbit | hqq | gptq")->capture_default_str();
  app.add_option("--calibration", o.calibration, "safetensors of captured layer inputs: tensor <weight name> = X [tokens, in]");
  app.add_option("--include", o.include, "quantize tensors matching GLOB (repeatable; replaces the default selection)");
  app.add_option("--exclude", o.exclude, "do not quantize tensors matching GLOB (repeatable)");
  app.add_option("--param-type", o.param_type, "scale/zero storage: f16 | f32")->capture_default_str();
  app.add_flag("--symmetric", o.symmetric, "symmetric codes (zero fixed at 2^(bits-1))");
  app.add_flag("--act-order", o.act_order, "gptq: quantize columns by descending Hessian diagonal (stores a permutation / g_idx)");
  app.add_option("--threads", o.threads, "threads (0: all cores)")->capture_default_str();
  app.add_flag("--dry-run", o.dry_run, "list what would be quantized and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    out << app.help();
    return 0;
  } catch (const CLI::CallForAllHelp&) {
    out << app.help("", CLI::AppFormatMode::All);
    return 0;
  } catch (const CLI::ParseError& e) {
    err << "lowbit-quantize: " << detail::one_line(e.what()) << " (see --help)" << std::endl;
    return e.get_exit_code() == 0 ? 2 : e.get_exit_code();
  }
  return run(o, out, err, ::isatty(STDERR_FILENO) == 1);
}

}  // namespace lowbit::tool
