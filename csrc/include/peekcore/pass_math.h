// Shared scalar math for the per-chunk pass: storage decoding and the HALS
// column update. Included by the CPU extension and by the CUDA sources, so the
// two implementations cannot drift apart (see shared/STYLE.md, torch_scatter).
#pragma once

#if defined(__CUDACC_RTC__)
// NVRTC has no C++ standard library headers.
namespace std {
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
}  // namespace std
#else
#include <cstdint>
#endif

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#define PEEK_HD __host__ __device__ __forceinline__
#else
#define PEEK_HD inline
#endif

namespace peekcore {

// Storage kinds of the streamed chunk: the table STORAGE_TYPES in
// peekcore/kernels/storage.py, written out (tests/test_kernels.py checks it).
enum class Storage : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

PEEK_HD float bits_to_float(std::uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

// IEEE binary16 bits -> float, exact for every input (subnormals, inf, nan).
PEEK_HD float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1fu) {  // inf / nan
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {  // normal
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal: renormalize
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  return bits_to_float(bits);
}

// bfloat16 bits -> float: the upper half of a binary32.
PEEK_HD float bf16_bits_to_float(std::uint16_t h) {
  return bits_to_float(static_cast<std::uint32_t>(h) << 16);
}

// One HALS coordinate step for entry a of column r of a nonnegative factor:
//   a <- max(0, a + (m_r - sum_k a_k g_kr) / g_rr)
// `resid` is m_r - sum_k a_k g_kr. A column whose diagonal Gram entry is zero
// (a dead component) is left unchanged; the solver re-seeds it.
template <typename T>
PEEK_HD T hals_step(T a, T resid, T g_rr) {
  if (!(g_rr > T(0))) return a;
  const T v = a + resid / g_rr;
  return v > T(0) ? v : T(0);
}

// HALS sweeps on one row of one model's factor, in place: f and m hold its n
// columns (the row and its MTTKRP row), g its n x n Gram block with row stride
// ldg. Columns in order, `sweeps` times; the one row loop of the CPU pass, the
// CPU resident update and the CUDA update_rows kernel.
template <typename T>
PEEK_HD void hals_sweeps(T* f, const T* m, const double* g, int ldg, int n, int sweeps) {
  for (int s = 0; s < sweeps; ++s)
    for (int r = 0; r < n; ++r) {
      T resid = m[r];
      for (int k = 0; k < n; ++k) resid -= f[k] * g[k * ldg + r];
      f[r] = hals_step(f[r], resid, g[r * ldg + r]);
    }
}

}  // namespace peekcore
