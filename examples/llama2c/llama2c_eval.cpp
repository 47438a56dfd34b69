// llama2c_eval: quantizes a llama2.c checkpoint with every lowbit method at several bit
// widths and group sizes, and measures what each does to the model.
//
//   llama2c_eval [--model-dir DIR] [--csv FILE] [--bits 8,4,3,2] [--group-sizes 32,64]
//                [--methods rtn,hqq,gptq,...] [--calibration-lines 6] [--param-type f32|f16]
//                [--threads N]
//
// DIR holds stories260K.bin, tok512.bin, tinystories_valid_30KB.txt and, optionally,
// stories260K_reference.json; --checkpoint/--tokenizer/--text point at other files (any
// llama2.c checkpoint, legacy or 'ak42' v1, with its tokenizer). The first lines of the
// text calibrate GPTQ (and the other calibrated methods); the remaining lines are held
// out. Per row: held-out perplexity beside the float model's, mean KL divergence of the
// next-token distribution from the float model's, top-1 agreement, bits per weight of the
// linear layers, quantization time, and decode tokens/s of the quantized model against
// the float model (timed alternately in the same run). Writes the table as CSV too.
#include <CLI/CLI.hpp>
#include <lowbit/core/threading.hpp>
#include <lowbit/version.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "llama2c/methods.hpp"
#include "llama2c/metrics.hpp"
#include "llama2c/model_files.hpp"
#include "llama2c/quantize.hpp"

namespace {

using namespace llama2c;

struct Row {
  std::string method;
  int bits = 0;
  Index group_size = 0;
  double bits_per_weight = 0;
  Scores scores;
  double quant_seconds = 0;
  double decode_tok_s = 0, float_decode_tok_s = 0;
};

// Decode tokens/s of both models over `tokens`, timed alternately `repeats` times each;
// the fastest run of each counts (the least disturbed by other work on the machine).
std::pair<double, double> decode_speed(const Transformer& model, const Transformer& reference, const Sequence& tokens,
                                       int repeats) {
  const auto run = [&](const Transformer& m) {
    auto session = m.session();
    const auto start = std::chrono::steady_clock::now();
    float sink = 0;
    for (int token : tokens) sink += session.step(token)(0);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!std::isfinite(sink)) fail("decode produced a non-finite logit");
    return seconds;
  };
  double best = 1e30, best_reference = 1e30;
  for (int r = 0; r < repeats; ++r) {
    best_reference = std::min(best_reference, run(reference));
    best = std::min(best, run(model));
  }
  const double n = static_cast<double>(tokens.size());
  return {n / best, n / best_reference};
}

Method make_method(const std::string& name, lowbit::QuantSpec spec, bool gptq_act_order) {
  if (name == "rtn") return rtn(spec);
  if (name == "hqq") return hqq(spec);
  if (name == "gptq") return gptq(spec, {.act_order = gptq_act_order});
#if __has_include(<lowbit/quantizers/omniquant.hpp>)
  if (name == "omniquant") return omniquant(spec);
#endif
#if __has_include(<lowbit/quantizers/qllm.hpp>)
  if (name == "qllm") return qllm(spec);
#endif
  fail("--methods: '", name, "' is not a method this build has");
}

std::vector<std::string> built_methods() {
  std::vector<std::string> names{"rtn", "hqq", "gptq"};
#if __has_include(<lowbit/quantizers/omniquant.hpp>)
  names.push_back("omniquant");
#endif
#if __has_include(<lowbit/quantizers/qllm.hpp>)
  names.push_back("qllm");
#endif
  return names;
}

void write_csv(const std::string& path, const std::vector<Row>& rows, double float_ppl) {
  std::ofstream out(path);
  check(static_cast<bool>(out), "cannot write '", path, "'");
  out << "method,bits,group_size,bits_per_weight,perplexity,float_perplexity,mean_kl,top1_agreement,"
         "quant_seconds,decode_tokens_per_s,float_decode_tokens_per_s,decode_speedup\n";
  for (const Row& r : rows) {
    char line[512];
    std::snprintf(line, sizeof line, "%s,%d,%ld,%.4f,%.5f,%.5f,%.6g,%.5f,%.4f,%.1f,%.1f,%.3f\n", r.method.c_str(), r.bits,
                  static_cast<long>(r.group_size), r.bits_per_weight, r.scores.perplexity(), float_ppl,
                  r.scores.mean_kl(), r.scores.top1(), r.quant_seconds, r.decode_tok_s, r.float_decode_tok_s,
                  r.decode_tok_s / r.float_decode_tok_s);
    out << line;
  }
  check(static_cast<bool>(out), "error writing '", path, "'");
}

// "yes"/"NO" for the summary.
const char* verdict(bool ok) { return ok ? "yes" : "NO"; }

int run(int argc, char** argv) {
  CLI::App app{"Quantize a llama2.c model with every lowbit method and measure perplexity, KL divergence and speed"};
  std::string model_directory;
  ModelFiles files;
  std::string csv = "llama2c_eval.csv";
  std::vector<int> bit_widths{8, 4, 3, 2};
  std::vector<Index> group_sizes{32, 64};
  std::vector<std::string> methods = built_methods();
  std::size_t calibration_lines = 6;
  int threads = 0, decode_tokens = 256, decode_repeats = 5;
  bool gptq_act_order = true;
  std::string param_type = "f32";
  app.add_option("--model-dir", model_directory,
                 "Directory with stories260K.bin, tok512.bin, tinystories_valid_30KB.txt "
                 "(default: $LOWBIT_LLAMA2C_DIR, else " LLAMA2C_MODEL_DIR ")");
  app.add_option("--checkpoint", files.checkpoint, "llama2.c checkpoint (legacy or 'ak42' v1), overrides --model-dir");
  app.add_option("--tokenizer", files.tokenizer, "Its tokenizer file, overrides --model-dir");
  app.add_option("--text", files.text, "Evaluation text, one story per line, overrides --model-dir");
  app.add_option("--csv", csv, "Where to write the table")->capture_default_str();
  app.add_option("--bits", bit_widths, "Bit widths")->delimiter(',')->check(CLI::Range(1, 8))->capture_default_str();
  app.add_option("--group-sizes", group_sizes, "Group sizes (0: one group per row)")->delimiter(',')->capture_default_str();
  app.add_option("--methods", methods, "Methods")->delimiter(',')->capture_default_str();
  app.add_option("--calibration-lines", calibration_lines, "First lines of the text used for calibration")
      ->capture_default_str();
  app.add_option("--threads", threads, "Threads for lowbit's kernels and quantizers (default: OpenMP's)");
  app.add_option("--decode-tokens", decode_tokens, "Tokens per decode-speed run")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  app.add_option("--decode-repeats", decode_repeats, "Decode-speed runs per model (fastest counts)")
      ->check(CLI::Range(1, 1000))->capture_default_str();
  app.add_option("--param-type", param_type, "Storage of scales and zeros")
      ->check(CLI::IsMember({"f32", "f16"}))->capture_default_str();
  app.add_option("--gptq-act-order", gptq_act_order, "GPTQ processes columns by descending Hessian diagonal")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  Eigen::setNbThreads(1);  // the engine's own products are small; lowbit threads its kernels
  if (threads > 0) lowbit::set_num_threads(threads);
  const ModelFiles defaults = ModelFiles::in(model_directory.empty() ? model_dir(LLAMA2C_MODEL_DIR) : std::filesystem::path(model_directory));
  if (files.checkpoint.empty()) files.checkpoint = defaults.checkpoint;
  if (files.tokenizer.empty()) files.tokenizer = defaults.tokenizer;
  if (files.text.empty()) files.text = defaults.text;
  files.reference = defaults.reference;

  const Weights weights = load_checkpoint(files.checkpoint);
  const Config& c = weights.config;
  const Tokenizer tokenizer = Tokenizer::load(files.tokenizer, c.vocab_size);
  const std::vector<std::string> lines = read_lines(files.text);
  const TextSplit split = split_lines(lines, calibration_lines);
  const std::vector<Sequence> calibration = encode_lines(tokenizer, split.calibration, c.seq_len);
  const std::vector<Sequence> held_out = encode_lines(tokenizer, split.held_out, c.seq_len);
  const auto count_tokens = [](const std::vector<Sequence>& s) {
    std::size_t n = 0;
    for (const auto& x : s) n += x.size();
    return n;
  };

  std::printf("lowbit %s, llama2c_eval, ISA %s, %d thread(s)\n", LOWBIT_VERSION_STRING,
              std::string(lowbit::isa_name(lowbit::active_isa())).c_str(), lowbit::num_threads());
  std::printf("model %s: dim %d, hidden %d, layers %d, heads %d (kv %d), vocab %d, seq_len %d\n",
              files.checkpoint.string().c_str(), c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
              c.seq_len);
  std::printf("text %s: %zu lines; calibration: first %zu lines, %zu tokens; held out: %zu lines, %zu tokens "
              "(%zu repeated lines left out)\n",
              files.text.string().c_str(), lines.size(), split.calibration.size(), count_tokens(calibration),
              split.held_out.size(), count_tokens(held_out), split.dropped);

  const Transformer float_model(weights);
  const Scores whole = evaluate(float_model, encode_lines(tokenizer, lines, c.seq_len));
  std::printf("float model, whole text: perplexity %.4f over %ld tokens", whole.perplexity(), static_cast<long>(whole.count));
  if (std::ifstream in(files.reference); in && files.checkpoint == defaults.checkpoint && files.text == defaults.text) {
    const auto reference = nlohmann::json::parse(in);
    std::printf(" (reference %.4f over %ld)", reference["eval_ppl"].get<double>(), reference["eval_tokens_scored"].get<long>());
  }
  std::printf("\n");
  const std::vector<MatrixF> float_logits = reference_logits(float_model, held_out);
  const Scores float_scores = evaluate(float_model, held_out);
  Sequence decode_sequence;
  for (const Sequence& s : held_out)
    for (int token : s)
      if (static_cast<int>(decode_sequence.size()) < std::min(decode_tokens, c.seq_len)) decode_sequence.push_back(token);
  std::printf("float model, held out: perplexity %.4f; linear layers %.2f MB\n", float_scores.perplexity(),
              static_cast<double>(float_model.linear_bytes()) / 1e6);
  std::printf("quantized: every linear layer (embedding/classifier and norms stay float), scales and zeros %s%s\n\n",
              param_type.c_str(), gptq_act_order ? ", GPTQ with act-order" : "");

  std::printf("%-10s %4s %5s %8s %9s %9s %10s %7s %9s %11s %11s %7s\n", "method", "bits", "group", "bits/w",
              "ppl", "float ppl", "mean KL", "top-1", "quant s", "decode t/s", "float t/s", "speed");
  std::vector<Row> rows;
  for (const std::string& name : methods) {
    for (int bits : bit_widths) {
      for (Index group : group_sizes) {
        const lowbit::QuantSpec spec{.bits = bits, .group_size = group,
                                     .param_type = param_type == "f16" ? lowbit::ParamType::Float16 : lowbit::ParamType::Float32};
        const Method method = make_method(name, spec, gptq_act_order);
        const QuantizedModel q = quantize_model(weights, method, calibration);
        Row row;
        row.method = method.name;
        row.bits = bits;
        row.group_size = group;
        row.bits_per_weight = 8.0 * static_cast<double>(q.model.linear_bytes()) / static_cast<double>(q.model.linear_weights());
        row.scores = evaluate(q.model, held_out, &float_logits);
        row.quant_seconds = q.seconds;
        std::tie(row.decode_tok_s, row.float_decode_tok_s) = decode_speed(q.model, float_model, decode_sequence, decode_repeats);
        std::printf("%-10s %4d %5ld %8.3f %9.4f %9.4f %10.3g %7.4f %9.3f %11.0f %11.0f %6.2fx\n", row.method.c_str(), bits,
                    static_cast<long>(group), row.bits_per_weight, row.scores.perplexity(), float_scores.perplexity(),
                    row.scores.mean_kl(), row.scores.top1(), row.quant_seconds, row.decode_tok_s, row.float_decode_tok_s,
                    row.decode_tok_s / row.float_decode_tok_s);
        std::fflush(stdout);
        rows.push_back(std::move(row));
      }
    }
  }
  write_csv(csv, rows, float_scores.perplexity());
  std::printf("\nwrote %s\n", csv.c_str());

  // The targets, checked on this run.
  const auto find = [&](const std::string& method, int bits, Index group) -> const Row* {
    for (const Row& r : rows)
      if (r.method == method && r.bits == bits && r.group_size == group) return &r;
    return nullptr;
  };
  std::printf("\nchecks\n");
  for (const Row& r : rows)
    if (r.bits == 8)
      std::printf("  %s 8-bit g%ld: mean KL %.3g < 1e-3: %s\n", r.method.c_str(), static_cast<long>(r.group_size),
                  r.scores.mean_kl(), verdict(r.scores.mean_kl() < 1e-3));
  std::map<std::pair<std::string, Index>, std::vector<const Row*>> by_method;
  for (const Row& r : rows) by_method[{r.method, r.group_size}].push_back(&r);
  for (auto& [key, list] : by_method) {
    std::sort(list.begin(), list.end(), [](const Row* a, const Row* b) { return a->bits < b->bits; });
    bool monotonic = true;
    for (std::size_t i = 1; i < list.size(); ++i)
      monotonic = monotonic && list[i]->scores.perplexity() < list[i - 1]->scores.perplexity() &&
                  list[i]->scores.mean_kl() < list[i - 1]->scores.mean_kl();
    std::printf("  %s g%ld: perplexity and KL fall with every added bit: %s\n", key.first.c_str(),
                static_cast<long>(key.second), verdict(monotonic));
  }
  for (int bits : {3, 2}) {
    for (Index group : group_sizes) {
      const Row* base = find("RTN", bits, group);
      if (!base) continue;
      std::vector<const Row*> at;
      for (const Row& r : rows)
        if (r.bits == bits && r.group_size == group) at.push_back(&r);
      std::sort(at.begin(), at.end(), [](const Row* a, const Row* b) { return a->scores.perplexity() < b->scores.perplexity(); });
      std::printf("  %d-bit g%ld, held-out perplexity, best first:", bits, static_cast<long>(group));
      for (const Row* r : at) std::printf(" %s %.3f", r->method.c_str(), r->scores.perplexity());
      std::printf("\n");
      for (const char* name : {"GPTQ", "HQQ"})
        if (const Row* r = find(name, bits, group))
          std::printf("    %s below RTN: %s\n", name, verdict(r->scores.perplexity() < base->scores.perplexity()));
    }
  }
  for (const Row& r : rows)
    if (r.bits == 4)
      std::printf("  %s 4-bit g%ld decode: %.0f tokens/s vs float %.0f (%.2fx): not slower: %s\n", r.method.c_str(),
                  static_cast<long>(r.group_size), r.decode_tok_s, r.float_decode_tok_s,
                  r.decode_tok_s / r.float_decode_tok_s, verdict(r.decode_tok_s >= r.float_decode_tok_s));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama2c_eval: %s\n", e.what());
    return 1;
  }
}
