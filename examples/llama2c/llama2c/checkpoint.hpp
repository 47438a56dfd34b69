// llama2.c checkpoints: the model's shape (Config), its float weights (Weights), and a
// loader that checks every size and offset against the file length before it reads.
//
// Two formats, both little-endian float32 after the header:
//   legacy  7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
//           seq_len; a negative vocab_size means the classifier is not shared), then
//           token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final,
//           the unused RoPE tables freq_cis_real/imag [seq_len, head_size / 2] each,
//           then the classifier [vocab, dim] when it is not shared.
//   v1      a 256-byte header: uint32 magic "ak42" (0x616b3432), int32 version 1, the
//           same 7 int32, uint8 shared_classifier, zero padding; then rms_att, rms_ffn,
//           rms_final, token_embedding, wq, wk, wv, wo, w1, w2, w3 (and the classifier
//           when not shared). Version 2 (int8 weights) is refused by name.
// Linear weights are [out, in] row-major, as lowbit expects; per-layer tensors are stored
// layer after layer.
#pragma once

#include <lowbit/core/error.hpp>
#include <lowbit/core/types.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace llama2c {

using lowbit::Index;
using MatrixF = lowbit::Matrix<float>;
using VectorF = lowbit::Vector<float>;

static_assert(std::endian::native == std::endian::little, "llama2.c checkpoints are little-endian");

// Throws lowbit::Error("llama2c: " + parts...).
template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  std::ostringstream message;
  message << "llama2c: ";
  (message << ... << std::forward<Parts>(parts));
  throw lowbit::Error(message.str());
}

template <class... Parts>
void check(bool condition, Parts&&... parts) {
  if (!condition) fail(std::forward<Parts>(parts)...);
}

// Reads a whole file; lowbit::Error naming the path when it cannot.
[[nodiscard]] inline std::vector<std::byte> read_file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  check(static_cast<bool>(in), "cannot open '", path.string(), "'");
  const std::streamoff size = in.tellg();
  check(size >= 0, "cannot determine the size of '", path.string(), "'");
  std::vector<std::byte> bytes(static_cast<std::size_t>(size));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(bytes.data()), size);
  check(in.gcount() == size, "error reading '", path.string(), "': got ", in.gcount(), " of ", size, " bytes");
  return bytes;
}

struct Config {
  int dim = 0;         // residual stream width
  int hidden_dim = 0;  // SwiGLU width
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;  // grouped KV: query head h reads kv head h / (n_heads / n_kv_heads)
  int vocab_size = 0;
  int seq_len = 0;     // longest sequence the model was trained on
  bool shared_classifier = true;  // logits = token_embedding x

  [[nodiscard]] int head_size() const { return dim / n_heads; }
  [[nodiscard]] int kv_dim() const { return dim / n_heads * n_kv_heads; }

  // Sizes a forward pass relies on. The bounds keep every kind of tensor below 2^40
  // floats, so the loader's size arithmetic cannot overflow 64 bits.
  // `context` starts the message of the error (e.g. the file name).
  void validate(const std::string& context = "config") const {
    constexpr int kMax = 1 << 20;
    const std::pair<const char*, int> fields[] = {{"dim", dim},           {"hidden_dim", hidden_dim},
                                                  {"n_layers", n_layers}, {"n_heads", n_heads},
                                                  {"n_kv_heads", n_kv_heads}, {"vocab_size", vocab_size},
                                                  {"seq_len", seq_len}};
    for (const auto& [name, value] : fields)
      check(value > 0 && value <= kMax, context, " ", name, " = ", value, " is outside 1..", kMax);
    check(dim % n_heads == 0, context, " dim = ", dim, " is not a multiple of n_heads = ", n_heads);
    check(n_heads % n_kv_heads == 0, context, " n_heads = ", n_heads, " is not a multiple of n_kv_heads = ", n_kv_heads);
    check(head_size() % 2 == 0, context, " head_size = dim / n_heads = ", head_size(), " is odd (RoPE rotates pairs)");
    const auto too_large = [](std::int64_t a, std::int64_t b, std::int64_t c) { return a * b * c > (std::int64_t{1} << 40); };
    check(!too_large(n_layers, dim, std::max(dim, hidden_dim)) && !too_large(vocab_size, dim, 1) &&
              !too_large(seq_len, head_size(), 1),
          context, " sizes (dim ", dim, ", hidden_dim ", hidden_dim, ", n_layers ", n_layers, ", vocab_size ", vocab_size,
          ") need more than 2^40 floats per tensor kind");
  }

  friend bool operator==(const Config&, const Config&) = default;
};

struct LayerWeights {
  VectorF rms_att, rms_ffn;  // [dim]
  MatrixF wq;                // [dim, dim]
  MatrixF wk, wv;            // [kv_dim, dim]
  MatrixF wo;                // [dim, dim]
  MatrixF w1, w3;            // [hidden, dim]
  MatrixF w2;                // [dim, hidden]
};

struct Weights {
  Config config;
  MatrixF token_embedding;  // [vocab, dim]
  std::vector<LayerWeights> layers;
  VectorF rms_final;        // [dim]
  MatrixF classifier;       // [vocab, dim]; empty when shared with the embedding

  [[nodiscard]] const MatrixF& output() const { return config.shared_classifier ? token_embedding : classifier; }
};

enum class CheckpointFormat { Legacy, V1 };

inline constexpr std::uint32_t kV1Magic = 0x616b3432;  // "ak42"
inline constexpr std::size_t kV1HeaderBytes = 256;
inline constexpr std::size_t kLegacyHeaderBytes = 7 * sizeof(std::int32_t);

namespace detail {

// Reads little-endian values from a byte span, checking each read against its end.
class ByteReader {
 public:
  ByteReader(std::span<const std::byte> bytes, std::string name) : bytes_(bytes), name_(std::move(name)) {}

  template <class Value>
  Value read(const char* what) {
    require_bytes(sizeof(Value), what);
    Value value;
    std::memcpy(&value, bytes_.data() + offset_, sizeof(Value));
    offset_ += sizeof(Value);
    return value;
  }

  // `rows` x `cols` float32 values; refuses NaN/Inf, naming the tensor.
  MatrixF read_matrix(Index rows, Index cols, const std::string& what) {
    MatrixF m(rows, cols);
    const std::size_t bytes = static_cast<std::size_t>(rows * cols) * sizeof(float);
    require_bytes(bytes, what.c_str());
    if (bytes != 0) std::memcpy(m.data(), bytes_.data() + offset_, bytes);
    offset_ += bytes;
    check(m.allFinite(), name_, ": tensor ", what, " holds NaN or Inf");
    return m;
  }

  VectorF read_vector(Index size, const std::string& what) {
    return read_matrix(size, 1, what).reshaped();
  }

  void skip(std::size_t bytes, const char* what) {
    require_bytes(bytes, what);
    offset_ += bytes;
  }

  [[nodiscard]] std::size_t offset() const { return offset_; }
  [[nodiscard]] std::size_t size() const { return bytes_.size(); }
  [[nodiscard]] const std::string& name() const { return name_; }

 private:
  void require_bytes(std::size_t count, const char* what) const {
    check(count <= bytes_.size() - offset_, name_, ": truncated: ", what, " needs ", count, " bytes at offset ",
          offset_, " but the file has ", bytes_.size(), " bytes");
  }

  std::span<const std::byte> bytes_;
  std::string name_;
  std::size_t offset_ = 0;
};

// Float32 count of every tensor after the header, in the order of `format`.
[[nodiscard]] inline std::uint64_t checkpoint_floats(const Config& c, CheckpointFormat format) {
  const std::uint64_t dim = static_cast<std::uint64_t>(c.dim), hidden = static_cast<std::uint64_t>(c.hidden_dim);
  const std::uint64_t layers = static_cast<std::uint64_t>(c.n_layers), kv = static_cast<std::uint64_t>(c.kv_dim());
  const std::uint64_t vocab = static_cast<std::uint64_t>(c.vocab_size);
  std::uint64_t floats = vocab * dim                                       // token_embedding
                         + layers * (2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * hidden * dim)  // per layer
                         + dim;                                            // rms_final
  if (format == CheckpointFormat::Legacy)
    floats += static_cast<std::uint64_t>(c.seq_len) * static_cast<std::uint64_t>(c.head_size());  // RoPE tables
  if (!c.shared_classifier) floats += vocab * dim;
  return floats;
}

inline Config read_config_fields(ByteReader& in) {
  Config c;
  c.dim = in.read<std::int32_t>("header dim");
  c.hidden_dim = in.read<std::int32_t>("header hidden_dim");
  c.n_layers = in.read<std::int32_t>("header n_layers");
  c.n_heads = in.read<std::int32_t>("header n_heads");
  c.n_kv_heads = in.read<std::int32_t>("header n_kv_heads");
  c.vocab_size = in.read<std::int32_t>("header vocab_size");
  c.seq_len = in.read<std::int32_t>("header seq_len");
  return c;
}

// Reads one kind of per-layer tensor for all layers, layer after layer.
template <class Member>
void read_layers(ByteReader& in, Weights& w, Member member, Index rows, Index cols, const char* name) {
  for (std::size_t l = 0; l < w.layers.size(); ++l) {
    auto& target = w.layers[l].*member;
    const std::string what = std::string(name) + "[" + std::to_string(l) + "]";
    if constexpr (std::is_same_v<std::remove_reference_t<decltype(target)>, VectorF>) target = in.read_vector(rows, what);
    else target = in.read_matrix(rows, cols, what);
  }
}

}  // namespace detail

// Parses a checkpoint held in memory; `name` appears in error messages.
[[nodiscard]] inline Weights parse_checkpoint(std::span<const std::byte> bytes, const std::string& name = "checkpoint") {
  detail::ByteReader in(bytes, name);
  CheckpointFormat format = CheckpointFormat::Legacy;
  Weights w;
  if (bytes.size() >= sizeof(std::uint32_t) && in.read<std::uint32_t>("magic") == kV1Magic) {
    format = CheckpointFormat::V1;
    const auto version = in.read<std::int32_t>("header version");
    check(version == 1, name, ": 'ak42' checkpoint version ", version,
          " is not supported (only version 1, float32 weights)");
    w.config = detail::read_config_fields(in);
    const auto shared = in.read<std::uint8_t>("header shared_classifier");
    check(shared <= 1, name, ": header shared_classifier = ", int(shared), " is not 0 or 1");
    w.config.shared_classifier = shared == 1;
    in.skip(kV1HeaderBytes - in.offset(), "header padding");
  } else {
    in = detail::ByteReader(bytes, name);
    w.config = detail::read_config_fields(in);
    w.config.shared_classifier = w.config.vocab_size > 0;
    if (w.config.vocab_size < 0 && w.config.vocab_size != std::numeric_limits<std::int32_t>::min())
      w.config.vocab_size = -w.config.vocab_size;
  }
  w.config.validate(name + ": corrupt header:");

  // Every size is known now: check the whole file length once, before reading.
  const Config& c = w.config;
  const std::uint64_t expected = in.offset() + detail::checkpoint_floats(c, format) * sizeof(float);
  check(bytes.size() == expected, name, ": file has ", bytes.size(), " bytes, the header (dim ", c.dim, ", hidden_dim ",
        c.hidden_dim, ", n_layers ", c.n_layers, ", vocab ", c.vocab_size, ", seq_len ", c.seq_len, ") needs ",
        expected, bytes.size() < expected ? " (truncated)" : " (trailing bytes)");

  const Index dim = c.dim, hidden = c.hidden_dim, kv = c.kv_dim(), vocab = c.vocab_size;
  w.layers.resize(static_cast<std::size_t>(c.n_layers));
  using L = LayerWeights;
  const auto read_attention = [&] {
    detail::read_layers(in, w, &L::wq, dim, dim, "wq");
    detail::read_layers(in, w, &L::wk, kv, dim, "wk");
    detail::read_layers(in, w, &L::wv, kv, dim, "wv");
    detail::read_layers(in, w, &L::wo, dim, dim, "wo");
  };
  const auto read_ffn = [&] {
    detail::read_layers(in, w, &L::w1, hidden, dim, "w1");
    detail::read_layers(in, w, &L::w2, dim, hidden, "w2");
    detail::read_layers(in, w, &L::w3, hidden, dim, "w3");
  };
  if (format == CheckpointFormat::Legacy) {
    w.token_embedding = in.read_matrix(vocab, dim, "token_embedding");
    detail::read_layers(in, w, &L::rms_att, dim, 1, "rms_att");
    read_attention();
    detail::read_layers(in, w, &L::rms_ffn, dim, 1, "rms_ffn");
    read_ffn();
    w.rms_final = in.read_vector(dim, "rms_final");
    in.skip(2 * static_cast<std::size_t>(c.seq_len) * static_cast<std::size_t>(c.head_size() / 2) * sizeof(float),
            "freq_cis");
  } else {
    detail::read_layers(in, w, &L::rms_att, dim, 1, "rms_att");
    detail::read_layers(in, w, &L::rms_ffn, dim, 1, "rms_ffn");
    w.rms_final = in.read_vector(dim, "rms_final");
    w.token_embedding = in.read_matrix(vocab, dim, "token_embedding");
    read_attention();
    read_ffn();
  }
  if (!c.shared_classifier) w.classifier = in.read_matrix(vocab, dim, "classifier");
  return w;
}

[[nodiscard]] inline Weights load_checkpoint(const std::filesystem::path& path) {
  const std::vector<std::byte> bytes = read_file_bytes(path);
  return parse_checkpoint(bytes, path.string());
}

// The bytes of `w` in `format` (the legacy RoPE tables are written as llama2.c's
// exporter computes them: cos / sin of position * 10000^(-2i / head_size)).
[[nodiscard]] inline std::vector<std::byte> serialize_checkpoint(const Weights& w, CheckpointFormat format) {
  const Config& c = w.config;
  c.validate();
  std::vector<std::byte> out;
  const auto put = [&out](const void* data, std::size_t bytes) {
    const auto* begin = static_cast<const std::byte*>(data);
    out.insert(out.end(), begin, begin + bytes);
  };
  const auto put_int = [&](std::int32_t v) { put(&v, sizeof v); };
  const auto put_floats = [&](const float* data, Index count) { put(data, static_cast<std::size_t>(count) * sizeof(float)); };
  const auto put_matrix = [&](const auto& m) { put_floats(m.data(), m.size()); };
  const auto put_layers = [&](auto member) {
    for (const auto& layer : w.layers) put_matrix(layer.*member);
  };
  const auto put_header_fields = [&](int vocab_field) {
    for (int v : {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, vocab_field, c.seq_len}) put_int(v);
  };
  using L = LayerWeights;
  const auto put_attention = [&] {
    put_layers(&L::wq);
    put_layers(&L::wk);
    put_layers(&L::wv);
    put_layers(&L::wo);
  };
  const auto put_ffn = [&] {
    put_layers(&L::w1);
    put_layers(&L::w2);
    put_layers(&L::w3);
  };
  if (format == CheckpointFormat::Legacy) {
    put_header_fields(c.shared_classifier ? c.vocab_size : -c.vocab_size);
    put_matrix(w.token_embedding);
    put_layers(&L::rms_att);
    put_attention();
    put_layers(&L::rms_ffn);
    put_ffn();
    put_matrix(w.rms_final);
    const int half = c.head_size() / 2;
    for (bool sine : {false, true})
      for (int pos = 0; pos < c.seq_len; ++pos)
        for (int i = 0; i < half; ++i) {
          const double angle = pos * std::pow(10000.0, -2.0 * i / c.head_size());
          const float v = static_cast<float>(sine ? std::sin(angle) : std::cos(angle));
          put(&v, sizeof v);
        }
  } else {
    const std::uint32_t magic = kV1Magic;
    put(&magic, sizeof magic);
    put_int(1);
    put_header_fields(c.vocab_size);
    const std::uint8_t shared = c.shared_classifier ? 1 : 0;
    put(&shared, 1);
    out.resize(kV1HeaderBytes, std::byte{0});
    put_layers(&L::rms_att);
    put_layers(&L::rms_ffn);
    put_matrix(w.rms_final);
    put_matrix(w.token_embedding);
    put_attention();
    put_ffn();
  }
  if (!c.shared_classifier) put_matrix(w.classifier);
  return out;
}

inline void save_checkpoint(const Weights& w, const std::filesystem::path& path, CheckpointFormat format) {
  const std::vector<std::byte> bytes = serialize_checkpoint(w, format);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  check(static_cast<bool>(out), "cannot write '", path.string(), "'");
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  check(static_cast<bool>(out), "error writing '", path.string(), "'");
}

}  // namespace llama2c
