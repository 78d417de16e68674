// AVX-512 micro-kernels of the CPU pass (declared in avx512.h): T += A^T X
// into packed strips, and the two orientations of W = X F. Each function
// carries target("avx512f"), so the file builds without -mavx512f and runs
// only where available() says so.
#include "avx512.h"

#ifdef PEEK_X86
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string>
#include <utility>

namespace peekcore {
namespace avx512 {
namespace {

// ---- T += A^T X for a block ----------------------------------------------------
// T (R x J) += A^T (R x nb) X (nb x J) with A row-major nb x R, nb small (a
// block). BLAS packs X for every call, which costs as much as the arithmetic
// when nb is a few dozen; the AVX-512 kernel below streams X once instead.
//
// Its T is packed in strips of 16 columns, [ceil(J/16)][R][16]: the tile one
// call updates (up to 16 rows x 16 columns, held in 16 registers while the
// block's rows of X go by) is one contiguous run of memory rather than R rows
// J floats apart. In a microbenchmark on the 2-core EPYC (R = 16, J = 50,176,
// 20 rows): 110 GFLOP/s per core against 70 for an 8 x 32 tile on row-major T.
// Each of the block's rows is a separate stream, too many for the hardware
// prefetchers: the kernel asks for each row 16 strips (1 KiB) ahead itself
// (pass medians 53-57 against 57-69 ms in interleaved runs, 2,000 x 256 x 196,
// R = 16, 2 threads; 4 and 8 strips ahead gained less, 32 and 64 lost).
constexpr int kPrefetchAhead = 16 * kStrip;

template <int RB, bool kPartial>
__attribute__((target("avx512f"))) void strip_rows_avx512(const float* a, int R, const float* x,
                                                          std::int64_t nb, std::int64_t J,
                                                          __mmask16 cols, float* tp) {
  // a: the block's A at column r0 (row stride R); x: X at the strip's first
  // column (row stride J); tp: the packed tile, RB x 16. Only the last strip
  // (J % 16 columns) loads X under a mask: GCC 12 keeps the accumulators of
  // the masked loop on the stack.
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_loadu_ps(tp + r * kStrip);
  for (std::int64_t i = 0; i < nb; ++i) {
    __m512 xi;
    if constexpr (kPartial) {
      xi = _mm512_maskz_loadu_ps(cols, x + i * J);
    } else {
      xi = _mm512_loadu_ps(x + i * J);
      __builtin_prefetch(x + i * J + kPrefetchAhead, 0, 3);
    }
    const float* ai = a + i * R;
    for (int r = 0; r < RB; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(ai[r]), xi, acc[r]);
  }
  for (int r = 0; r < RB; ++r) _mm512_storeu_ps(tp + r * kStrip, acc[r]);
}

// A tile of 1..16 rows, by its count; [0] full strips, [1] the partial one.
using StripFn = void (*)(const float*, int, const float*, std::int64_t, std::int64_t, __mmask16,
                         float*);
template <int... RB>
constexpr std::array<std::array<StripFn, sizeof...(RB) + 1>, 2> strip_table(
    std::integer_sequence<int, RB...>) {
  return {{{nullptr, strip_rows_avx512<RB + 1, false>...},
           {nullptr, strip_rows_avx512<RB + 1, true>...}}};
}
constexpr auto kStripRows = strip_table(std::make_integer_sequence<int, kStrip>{});

// ---- W = X F_d for a block (the MTTKRP's first contraction) --------------------
// W (n x R) = X (n x K) F (K x R), n = b * P rows of K = I_d values, R small.
// OpenBLAS packs X for every call (a second copy of the block); for R <= 64
// this kernel reads X where it lies instead: a tile of QB rows x R columns of
// W stays in registers (RZ = ceil(R / 16) vectors per row, QB * RZ <= 16)
// while k runs over the rows of F, whose zero-padded copy (K x 16 RZ) is read
// from L1. The QB rows of X are consecutive in memory, so X streams through
// in order.
template <int QB, int RZ>
__attribute__((target("avx512f"))) void last_mode_tile_avx512(const float* x, std::int64_t K,
                                                              const float* fpad, int R, float* w) {
  __m512 acc[QB][RZ];
  for (int q = 0; q < QB; ++q)
    for (int z = 0; z < RZ; ++z) acc[q][z] = _mm512_setzero_ps();
  for (std::int64_t k = 0; k < K; ++k) {
    __m512 fk[RZ];
    for (int z = 0; z < RZ; ++z) fk[z] = _mm512_loadu_ps(fpad + (k * RZ + z) * 16);
    for (int q = 0; q < QB; ++q) {
      const __m512 xq = _mm512_set1_ps(x[q * K + k]);
      for (int z = 0; z < RZ; ++z) acc[q][z] = _mm512_fmadd_ps(xq, fk[z], acc[q][z]);
    }
  }
  const __mmask16 tail = static_cast<__mmask16>((1u << (R - 16 * (RZ - 1))) - 1u);
  for (int q = 0; q < QB; ++q) {
    for (int z = 0; z + 1 < RZ; ++z) _mm512_storeu_ps(w + q * R + 16 * z, acc[q][z]);
    _mm512_mask_storeu_ps(w + q * R + 16 * (RZ - 1), tail, acc[q][RZ - 1]);
  }
}

template <int RZ>
__attribute__((target("avx512f"))) void last_mode_avx512(const float* x, std::int64_t n,
                                                         std::int64_t K, const float* fpad, int R,
                                                         float* w) {
  constexpr int QB = 16 / RZ;
  std::int64_t q0 = 0;
  for (; q0 + QB <= n; q0 += QB) last_mode_tile_avx512<QB, RZ>(x + q0 * K, K, fpad, R, w + q0 * R);
  for (; q0 < n; ++q0) last_mode_tile_avx512<1, RZ>(x + q0 * K, K, fpad, R, w + q0 * R);
}

using LastModeFn = void (*)(const float*, std::int64_t, std::int64_t, const float*, int, float*);
constexpr LastModeFn kLastMode[5] = {nullptr, last_mode_avx512<1>, last_mode_avx512<2>,
                                     last_mode_avx512<3>, last_mode_avx512<4>};

// For R <= 8 most lanes of that kernel's accumulators would be idle (it
// spends K FMAs per row whatever R is), so narrow ranks take the other
// orientation: 16 values of k per vector, one accumulator per (row, column),
// the column sums reduced at the end: about K R / 16 FMAs per row. F comes
// transposed and zero-padded to whole vectors (R x kpad).
template <int QB, int RN>
__attribute__((target("avx512f"))) void narrow_tile_avx512(const float* x, std::int64_t K,
                                                           const float* ft, std::int64_t kpad,
                                                           float* w) {
  __m512 acc[QB][RN];
  for (int q = 0; q < QB; ++q)
    for (int r = 0; r < RN; ++r) acc[q][r] = _mm512_setzero_ps();
  const std::int64_t k16 = K - K % 16;
  for (std::int64_t k = 0; k < k16; k += 16) {
    __m512 xq[QB];
    for (int q = 0; q < QB; ++q) xq[q] = _mm512_loadu_ps(x + q * K + k);
    for (int r = 0; r < RN; ++r) {
      const __m512 fr = _mm512_loadu_ps(ft + r * kpad + k);
      for (int q = 0; q < QB; ++q) acc[q][r] = _mm512_fmadd_ps(xq[q], fr, acc[q][r]);
    }
  }
  if (k16 < K) {  // the last K % 16 values, once (not in the loop: see strip_rows_avx512)
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k16)) - 1u);
    for (int q = 0; q < QB; ++q) {
      const __m512 xq = _mm512_maskz_loadu_ps(tail, x + q * K + k16);
      for (int r = 0; r < RN; ++r)
        acc[q][r] = _mm512_fmadd_ps(xq, _mm512_loadu_ps(ft + r * kpad + k16), acc[q][r]);
    }
  }
  // the sums of the lanes (not _mm512_reduce_add_ps: GCC 12 warns inside it)
  alignas(64) float lanes[16];
  for (int q = 0; q < QB; ++q)
    for (int r = 0; r < RN; ++r) {
      _mm512_store_ps(lanes, acc[q][r]);
      float sum = 0.0f;
      for (float v : lanes) sum += v;
      w[q * RN + r] = sum;
    }
}

template <int RN>
__attribute__((target("avx512f"))) void narrow_avx512(const float* x, std::int64_t n,
                                                      std::int64_t K, const float* ft,
                                                      std::int64_t kpad, float* w) {
  constexpr int QB = RN <= 6 ? 4 : 3;  // QB * RN <= 24 accumulators
  std::int64_t q0 = 0;
  for (; q0 + QB <= n; q0 += QB) narrow_tile_avx512<QB, RN>(x + q0 * K, K, ft, kpad, w + q0 * RN);
  for (; q0 < n; ++q0) narrow_tile_avx512<1, RN>(x + q0 * K, K, ft, kpad, w + q0 * RN);
}

using NarrowFn = void (*)(const float*, std::int64_t, std::int64_t, const float*, std::int64_t,
                          float*);
constexpr NarrowFn kNarrow[kNarrowRank + 1] = {
    nullptr,          narrow_avx512<1>, narrow_avx512<2>, narrow_avx512<3>, narrow_avx512<4>,
    narrow_avx512<5>, narrow_avx512<6>, narrow_avx512<7>, narrow_avx512<8>};

}  // namespace

bool available() {
  static const bool has = [] {
    const char* want = std::getenv("PEEKCORE_CPU_KERNELS");
    return __builtin_cpu_supports("avx512f") && !(want && std::string(want) == "blas");
  }();
  return has;
}

__attribute__((target("avx512f"))) void outer_acc_packed(const float* a, int R, const float* x,
                                                         std::int64_t nb, std::int64_t J,
                                                         float* packed) {
  for (std::int64_t j0 = 0; j0 < J; j0 += kStrip) {
    const std::int64_t w = std::min<std::int64_t>(kStrip, J - j0);
    const __mmask16 cols = static_cast<__mmask16>((1u << w) - 1u);
    const auto& fns = kStripRows[w < kStrip];
    float* tp = packed + j0 * R;  // strip j0 / 16 starts at (j0 / 16) * R * 16
    for (int r0 = 0; r0 < R; r0 += kStrip)
      fns[std::min(kStrip, R - r0)](a + r0, R, x + j0, nb, J, cols, tp + r0 * kStrip);
  }
}

void last_mode(int rz, const float* x, std::int64_t n, std::int64_t K, const float* fpad, int R,
               float* w) {
  kLastMode[rz](x, n, K, fpad, R, w);
}

// Whether the narrow kernel beats the wide one for rows of K values and R <= 8
// columns. Per row the wide kernel spends about 2 K operations (a broadcast and
// an FMA per k); the narrow one about ceil(K / 16) (1 + 4 R / 3) vector
// operations plus 17 R to sum the lanes of its R accumulators. The sums make
// it lose on short rows: a 14 x 14 map contracted over 14 values ran 2x slower.
bool narrow_pays(std::int64_t K, int R) {
  const double narrow = static_cast<double>((K + 15) / 16) * (1.0 + 4.0 * R / 3.0) + 17.0 * R;
  return narrow < 2.0 * static_cast<double>(K);
}

void narrow(int R, const float* x, std::int64_t n, std::int64_t K, const float* ft,
            std::int64_t kpad, float* w) {
  kNarrow[R](x, n, K, ft, kpad, w);
}

}  // namespace avx512
}  // namespace peekcore
#endif  // PEEK_X86
