// Instruction-set dispatch: which SIMD variant the kernels use, chosen at run time.
//
// SIMD code is compiled with per-function target attributes, so the library needs no
// -march flag and one binary runs everywhere. The active ISA is the best the CPU has,
// overridden by the environment variable LOWBIT_ISA=scalar|avx2|avx512|neon (read once)
// or by lowbit::set_isa().
#pragma once

#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>

#include "lowbit/core/error.hpp"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define LOWBIT_ARCH_X86 1
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define LOWBIT_ARCH_NEON 1
#include <arm_neon.h>
#endif

// ISA-dispatch macros: function attributes that let one header hold several variants.
#if defined(LOWBIT_ARCH_X86) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_HAVE_AVX2 1
#define LOWBIT_HAVE_AVX512 1
#define LOWBIT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LOWBIT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif

namespace lowbit {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Neon = 3 };

[[nodiscard]] inline std::string_view isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Neon: return "neon";
  }
  return "unknown";
}

[[nodiscard]] inline Isa parse_isa(std::string_view name) {
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon})
    if (name == isa_name(isa)) return isa;
  detail::fail("ISA name '", std::string(name), "' is not one of scalar, avx2, avx512, neon");
}

// True when this build has the variant and the CPU can run it.
[[nodiscard]] inline bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
#if defined(LOWBIT_HAVE_AVX2)
    case Isa::Avx2:
      // F16C ships with every AVX2 CPU (and clang 14 cannot query it).
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
#if defined(LOWBIT_ARCH_NEON)
    case Isa::Neon: return true;
#endif
    default: return false;
  }
}

// The best variant this CPU runs.
[[nodiscard]] inline Isa best_isa() {
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Neon})
    if (isa_supported(isa)) return isa;
  return Isa::Scalar;
}

namespace detail {
inline std::atomic<int>& active_isa_slot() {
  static std::atomic<int> slot{[] {
    const char* env = std::getenv("LOWBIT_ISA");
    if (env == nullptr || *env == '\0') return static_cast<int>(best_isa());
    const Isa wanted = parse_isa(env);
    require(isa_supported(wanted), "LOWBIT_ISA=", env, " is not supported by this CPU or build");
    return static_cast<int>(wanted);
  }()};
  return slot;
}

// `v` as a register operand the compiler may not turn back into a memory operand. A
// kernel loads a vector once and uses it in several FMAs (x against four rows, a
// weight vector against several tokens); GCC's tuning for AMD Zen (-march=native
// there) folds such a load into every use, one load per FMA, and the GEMV and matmul
// kernels ran 1.1-1.7x slower so. The empty asm emits no instruction.
#if defined(LOWBIT_HAVE_AVX2)
namespace avx2 {
template <class V>
[[gnu::always_inline]] LOWBIT_TARGET_AVX2 inline V in_register(V v) {
  asm("" : "+x"(v));
  return v;
}
}  // namespace avx2
#endif
#if defined(LOWBIT_HAVE_AVX512)
namespace avx512 {
template <class V>
[[gnu::always_inline]] LOWBIT_TARGET_AVX512 inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}
}  // namespace avx512
#endif
}  // namespace detail

// The variant kernels use now.
[[nodiscard]] inline Isa active_isa() {
  return static_cast<Isa>(detail::active_isa_slot().load(std::memory_order_relaxed));
}

// Forces a variant for the whole process (tests and benchmarks compare them this way).
inline void set_isa(Isa isa) {
  detail::require(isa_supported(isa), "set_isa(", isa_name(isa),
                  "): not supported by this CPU or build");
  detail::active_isa_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
}

}  // namespace lowbit
