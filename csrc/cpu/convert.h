// Element conversions to fp32 written so that the compiler can vectorise them
// (no branches, no lookup tables), plus the multiversioning attribute.
#pragma once

#include <cstdint>
#include <cstring>

// Build the hot loops for AVX-512, AVX2 and baseline x86-64 and pick one at
// load time, so that the wheel needs no -march flag. Elsewhere: one version.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(SL_NO_MULTIVERSION)
#define SL_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SL_MULTIVERSION
#endif

#define SL_INLINE inline __attribute__((always_inline))

namespace sensitivity_lora::cpu {

SL_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

SL_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// bfloat16 is the top half of an fp32: widening is a shift.
SL_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE half -> fp32, every case computed and the right one selected.
SL_INLINE float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  // Normal numbers: re-bias the exponent from 15 to 127.
  const uint32_t normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  // Inf / NaN keep their payload under an all-ones exponent.
  const uint32_t special = sign | 0x7f800000u | (mantissa << 13);
  // Zero and subnormals: mantissa · 2^-24, exact in fp32.
  const uint32_t tiny = sign | float_to_bits(static_cast<float>(mantissa) * 5.9604644775390625e-8f);
  const uint32_t bits = exponent == 0 ? tiny : (exponent == 31 ? special : normal);
  return bits_to_float(bits);
}

struct Bf16ToFloat {
  using In = uint16_t;
  using Acc = float;
  static SL_INLINE float convert(uint16_t v) { return bf16_to_float(v); }
};

struct F16ToFloat {
  using In = uint16_t;
  using Acc = float;
  static SL_INLINE float convert(uint16_t v) { return f16_to_float(v); }
};

struct FloatToFloat {
  using In = float;
  using Acc = float;
  static SL_INLINE float convert(float v) { return v; }
};

// fp64 input keeps fp64 all the way (no loss against the oracle).
struct DoubleToDouble {
  using In = double;
  using Acc = double;
  static SL_INLINE double convert(double v) { return v; }
};

}  // namespace sensitivity_lora::cpu
