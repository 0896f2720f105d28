// IEEE half <-> float in plain C++ (no F16C or _Float16 needed): the portable kernels' conversions.
#pragma once
#include <stdint.h>
#include <string.h>

#include <cmath>

namespace olive_lab {

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0) return (sign ? -1.f : 1.f) * std::ldexp(static_cast<float>(mantissa), -24);
  uint32_t bits = exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)
                                 : sign | ((exponent + 112) << 23) | (mantissa << 13);
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  const uint16_t sign = (bits >> 16) & 0x8000u;
  const float magnitude = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00u;
  if (magnitude >= 65520.f) return sign | 0x7c00u;                 // rounds to infinity
  if (magnitude < 6.103515625e-05f) {                               // subnormal half
    return sign | static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.f));
  }
  const uint32_t exponent = ((bits >> 23) & 0xff) - 112, mantissa = bits & 0x7fffffu;
  uint32_t half = (exponent << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;                          // round to nearest, ties to even
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
  return sign | static_cast<uint16_t>(half);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return half_to_float(v); }
inline void store(float v, float* out) { *out = v; }
inline void store(float v, uint16_t* out) { *out = float_to_half(v); }

}  // namespace olive_lab
