// AVX-512 micro-kernels of the CPU pass (float32 only), for the two
// contractions of a block of samples; cp_pass.cpp chooses them at run time
// (available()) and falls back on OpenBLAS. Shapes are row-major.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#define PEEK_X86 1
#endif

namespace peekcore {
namespace avx512 {

// Columns of T per packed strip (one 512-bit vector of floats).
constexpr int kStrip = 16;
// Widest rank the narrow W kernel takes.
constexpr int kNarrowRank = 8;

#ifdef PEEK_X86
// Whether the CPU has AVX-512F and PEEKCORE_CPU_KERNELS is not "blas" (which
// turns these kernels off: tests of the fallback, comparisons).
bool available();

// T += A^T X for a block: a (nb x R), x (nb x J, row stride J), T packed in
// strips of kStrip columns, [ceil(J / kStrip)][R][kStrip].
void outer_acc_packed(const float* a, int R, const float* x, std::int64_t nb, std::int64_t J,
                      float* packed);

// w (n x R) = x (n x K) F for R <= 64: fpad is F zero-padded to K x (16 rz),
// rz = ceil(R / 16) in 1..4.
void last_mode(int rz, const float* x, std::int64_t n, std::int64_t K, const float* fpad, int R,
               float* w);

// Whether narrow() beats last_mode() for rows of K values and R <= kNarrowRank.
bool narrow_pays(std::int64_t K, int R);

// w (n x R) = x (n x K) F for 1 <= R <= kNarrowRank: ft is F^T zero-padded to
// R x kpad, kpad = K rounded up to 16.
void narrow(int R, const float* x, std::int64_t n, std::int64_t K, const float* ft,
            std::int64_t kpad, float* w);
#endif

}  // namespace avx512
}  // namespace peekcore
