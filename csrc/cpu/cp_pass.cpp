// CPU implementation of the per-chunk pass (declared in cp_pass.h).
//
// The chunk is processed in blocks of samples small enough to stay in cache.
// The threads share each block: thread t owns a contiguous range of the rows
// p of P = I_1 .. I_{d-1}, i.e. columns [p_lo K, p_hi K) of X (K = I_d) and
// of T. For each block every thread
//   1. copies / decodes its columns of the block into its buffer (F16C for half),
//   2. W = X_blk,t (bs*P_t x K) @ F_d (K x R)       AVX-512 kernel (else BLAS gemm)
//   3. M_t = sum over its p of W[., p, .] * KR[p, .]  KR = F_1 (.) .. (.) F_{d-1}
//   -- barrier: M = sum_t M_t, the same sum in every thread --
//   4. A_blk from M: ALS  A = M G^-1 (float64), or HALS sweeps on the old rows
//      (every thread solves the same small system; thread 0 stores the rows)
//   5. T[:, its columns] += A_blk^T X_blk,t    AVX-512 kernel (else BLAS), its
//      slice of the block still in cache
// so each sample is read from main memory once per iteration, T exists once
// (no per-thread copies to sum), and each thread's working set is its share
// of the columns.
#include "cp_pass.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PEEK_X86 1
#endif

#include "peekcore/pass_math.h"

extern "C" {
#include "cblas.h"
}

namespace peekcore {
namespace {

// ---- BLAS wrappers ---------------------------------------------------------
inline void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, std::int64_t m, std::int64_t n,
                 std::int64_t k, float alpha, const float* a, std::int64_t lda, const float* b,
                 std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, ta, tb, static_cast<blasint>(m), static_cast<blasint>(n),
                    static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda), b,
                    static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}
inline void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, std::int64_t m, std::int64_t n,
                 std::int64_t k, double alpha, const double* a, std::int64_t lda, const double* b,
                 std::int64_t ldb, double beta, double* c, std::int64_t ldc) {
  scipy_cblas_dgemm(CblasRowMajor, ta, tb, static_cast<blasint>(m), static_cast<blasint>(n),
                    static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda), b,
                    static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

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
#ifdef PEEK_X86
constexpr int kStrip = 16;
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

__attribute__((target("avx512f"))) void outer_acc_packed_avx512(const float* a, int R,
                                                                const float* x, std::int64_t nb,
                                                                std::int64_t J, float* packed) {
  for (std::int64_t j0 = 0; j0 < J; j0 += kStrip) {
    const std::int64_t w = std::min<std::int64_t>(kStrip, J - j0);
    const __mmask16 cols = static_cast<__mmask16>((1u << w) - 1u);
    const auto& fns = kStripRows[w < kStrip];
    float* tp = packed + j0 * R;  // strip j0 / 16 starts at (j0 / 16) * R * 16
    for (int r0 = 0; r0 < R; r0 += kStrip)
      fns[std::min(kStrip, R - r0)](a + r0, R, x + j0, nb, J, cols, tp + r0 * kStrip);
  }
}

// PEEKCORE_CPU_KERNELS=blas turns the AVX-512 kernels off (tests of the
// fallback, comparisons).
bool cpu_has_avx512f() {
  static const bool has = [] {
    const char* want = std::getenv("PEEKCORE_CPU_KERNELS");
    return __builtin_cpu_supports("avx512f") && !(want && std::string(want) == "blas");
  }();
  return has;
}
#endif

// A calling thread's scratch, kept from one chunk to the next (OpenMP reuses
// its threads): allocated per chunk, its megabytes of fresh pages were faulted
// in and zeroed on every call. Slot k of type T holds n elements, contents
// unspecified; released when far larger than asked for. (A chunk call costs
// ~0.2 ms beyond its blocks at 2,000 x 256 x 196, R = 16.)
template <typename T>
T* thread_buffer(int slot, std::size_t n) {
  thread_local std::array<std::vector<T>, 4> buffers;
  std::vector<T>& b = buffers[static_cast<std::size_t>(slot)];
  if (b.size() < n || b.size() > 4 * n + (std::size_t{1} << 22)) {
    std::vector<T>().swap(b);
    b.resize(n);
  }
  return b.data();
}

// One thread's columns [c0, c1) of T. With AVX-512 and float they are
// accumulated packed (strips of 16 columns, see above) and added into the
// R x J output by flush(); otherwise BLAS adds into the output directly.
template <typename T>
class ColumnT {
 public:
  ColumnT(int R, std::int64_t J, std::int64_t c0, std::int64_t c1, T* out)
      : R_(R), J_(J), c0_(c0), width_(c1 - c0), out_(out) {
#ifdef PEEK_X86
    if constexpr (std::is_same_v<T, float>) {
      if (cpu_has_avx512f()) {
        const std::size_t n = static_cast<std::size_t>(R * ((width_ + 15) / 16) * 16);
        packed_ = thread_buffer<float>(3, n);
        std::fill(packed_, packed_ + n, 0.0f);
      }
    }
#endif
  }

  // T[:, c0:c1] += A^T (R x nb) X (nb x (c1 - c0), row-major)
  void add(const T* a, const T* x, std::int64_t nb) {
#ifdef PEEK_X86
    if constexpr (std::is_same_v<T, float>) {
      if (packed_ != nullptr) {
        outer_acc_packed_avx512(a, R_, x, nb, width_, packed_);
        return;
      }
    }
#endif
    gemm(CblasTrans, CblasNoTrans, R_, width_, nb, T(1), a, R_, x, width_, T(1), out_ + c0_, J_);
  }

  // Add the packed accumulator into the output (a no-op on the BLAS path), row
  // by row so both sides are read in order.
  void flush() {
    if (packed_ == nullptr) return;
    for (int r = 0; r < R_; ++r) {
      T* out = out_ + r * J_ + c0_;
      for (std::int64_t j0 = 0; j0 < width_; j0 += 16) {
        const float* tile = packed_ + (j0 * R_ + r * 16);  // strip j0 / 16, row r
        const std::int64_t n = std::min<std::int64_t>(16, width_ - j0);
        for (std::int64_t j = 0; j < n; ++j) out[j0 + j] += tile[j];
      }
    }
  }

 private:
  int R_;
  std::int64_t J_, c0_, width_;
  T* out_;
  float* packed_ = nullptr;  // this thread's buffer (slot 3)
};

// ---- W = X F_d for a block (the MTTKRP's first contraction) --------------------
// W (n x R) = X (n x K) F (K x R), n = b * P rows of K = I_d values, R small.
// OpenBLAS packs X for every call (a second copy of the block); for R <= 64
// this kernel reads X where it lies instead: a tile of QB rows x R columns of
// W stays in registers (RZ = ceil(R / 16) vectors per row, QB * RZ <= 16)
// while k runs over the rows of F, whose zero-padded copy (K x 16 RZ) is read
// from L1. The QB rows of X are consecutive in memory, so X streams through
// in order.
#ifdef PEEK_X86
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

constexpr int kNarrowRank = 8;

// Whether the narrow kernel beats the wide one for rows of K values and R <= 8
// columns. Per row the wide kernel spends about 2 K operations (a broadcast and
// an FMA per k); the narrow one about ceil(K / 16) (1 + 4 R / 3) vector
// operations plus 17 R to sum the lanes of its R accumulators. The sums make
// it lose on short rows: a 14 x 14 map contracted over 14 values ran 2x slower.
inline bool narrow_pays(std::int64_t K, int R) {
  const double narrow = static_cast<double>((K + 15) / 16) * (1.0 + 4.0 * R / 3.0) + 17.0 * R;
  return narrow < 2.0 * static_cast<double>(K);
}

using NarrowFn = void (*)(const float*, std::int64_t, std::int64_t, const float*, std::int64_t,
                          float*);
constexpr NarrowFn kNarrow[kNarrowRank + 1] = {
    nullptr,          narrow_avx512<1>, narrow_avx512<2>, narrow_avx512<3>, narrow_avx512<4>,
    narrow_avx512<5>, narrow_avx512<6>, narrow_avx512<7>, narrow_avx512<8>};
#endif

// W = X F_d for every block of a pass: the kernels above for float
// on AVX-512 (narrow ones for R <= 8 where narrow_pays, else R <= 64), else BLAS.
template <typename T>
class LastModeProduct {
 public:
  LastModeProduct(const T* f, std::int64_t K, int R) : f_(f), K_(K), R_(R) {
#ifdef PEEK_X86
    if constexpr (std::is_same_v<T, float>) {
      rz_ = (R + 15) / 16;
      if (R <= kNarrowRank && narrow_pays(K, R) && cpu_has_avx512f()) {
        kpad_ = (K + 15) / 16 * 16;  // F^T, zero-padded rows
        fpad_.assign(static_cast<std::size_t>(R * kpad_), 0.0f);
        for (std::int64_t k = 0; k < K; ++k)
          for (int r = 0; r < R; ++r) fpad_[r * kpad_ + k] = f[k * R + r];
      } else if (rz_ <= 4 && cpu_has_avx512f()) {
        fpad_.assign(static_cast<std::size_t>(K * rz_ * 16), 0.0f);
        for (std::int64_t k = 0; k < K; ++k)
          std::copy(f + k * R, f + (k + 1) * R, fpad_.begin() + k * rz_ * 16);
      }
    }
#endif
  }

  // w (n x R) = x (n x K) @ F
  void apply(const T* x, std::int64_t n, T* w) const {
#ifdef PEEK_X86
    if constexpr (std::is_same_v<T, float>) {
      if (kpad_ > 0) {
        kNarrow[R_](x, n, K_, fpad_.data(), kpad_, w);
        return;
      }
      if (!fpad_.empty()) {
        kLastMode[rz_](x, n, K_, fpad_.data(), R_, w);
        return;
      }
    }
#endif
    gemm(CblasNoTrans, CblasNoTrans, n, R_, K_, T(1), x, K_, f_, R_, T(0), w, R_);
  }

 private:
  const T* f_;
  std::int64_t K_;
  int R_;
  int rz_ = 0;
  std::int64_t kpad_ = 0;    // > 0: the narrow kernel, fpad_ holds F^T (R x kpad_)
  std::vector<float> fpad_;  // else F zero-padded to K x 16 rz_
};

// ---- decoding ----------------------------------------------------------------
#ifdef PEEK_X86
__attribute__((target("avx2,f16c"))) void decode_half_f16c(const std::uint16_t* src, float* dst,
                                                           std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
}
bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
  return has;
}
#endif

template <typename T>
void decode_half(const std::uint16_t* src, T* dst, std::int64_t n) {
#ifdef PEEK_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_f16c()) {
      decode_half_f16c(src, dst, n);
      return;
    }
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(half_bits_to_float(src[i]));
}

template <typename T>
void decode_bf16(const std::uint16_t* src, T* dst, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(bf16_bits_to_float(src[i]));
}

template <typename T, typename S>
void convert(const S* src, T* dst, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Decode n elements starting at element offset `first` of the chunk into dst.
template <typename T>
void decode_block(const void* chunk, int storage, std::int64_t first, std::int64_t n, T* dst) {
  const std::int64_t kSlice = 1 << 16;
  const std::int64_t slices = (n + kSlice - 1) / kSlice;
  for (std::int64_t s = 0; s < slices; ++s) {
    const std::int64_t lo = s * kSlice;
    const std::int64_t len = std::min(kSlice, n - lo);
    switch (static_cast<Storage>(storage)) {
      case Storage::kFloat16:
        decode_half(static_cast<const std::uint16_t*>(chunk) + first + lo, dst + lo, len);
        break;
      case Storage::kBFloat16:
        decode_bf16(static_cast<const std::uint16_t*>(chunk) + first + lo, dst + lo, len);
        break;
      case Storage::kFloat32:
        convert(static_cast<const float*>(chunk) + first + lo, dst + lo, len);
        break;
      case Storage::kFloat64:
        convert(static_cast<const double*>(chunk) + first + lo, dst + lo, len);
        break;
    }
  }
}

template <typename T>
double sum_squares(const T* x, std::int64_t n) {
  double total = 0.0;
  for (std::int64_t i = 0; i < n; ++i) total += static_cast<double>(x[i]) * x[i];
  return total;
}

std::size_t storage_bytes(int storage) {
  switch (static_cast<Storage>(storage)) {
    case Storage::kFloat16:
    case Storage::kBFloat16:
      return 2;
    case Storage::kFloat32:
      return 4;
    case Storage::kFloat64:
      return 8;
  }
  throw std::invalid_argument("unknown storage code");
}

// The Khatri-Rao product of the factors of modes 1 .. d-1 (P x R, the last
// of them fastest), the weights of step 3.
template <typename T>
std::vector<T> khatri_rao_leading(const PassArgs<T>& args) {
  const int R = args.rank;
  const int d = static_cast<int>(args.dims.size());
  std::vector<T> kr(args.factors[0], args.factors[0] + args.dims[0] * R);
  for (int mode = 1; mode + 1 < d; ++mode) {
    const std::int64_t rows = static_cast<std::int64_t>(kr.size()) / R, I = args.dims[mode];
    std::vector<T> next(static_cast<std::size_t>(rows * I * R));
    for (std::int64_t q = 0; q < rows; ++q)
      for (std::int64_t i = 0; i < I; ++i)
        for (int r = 0; r < R; ++r)
          next[(q * I + i) * R + r] = kr[q * R + r] * args.factors[mode][i * R + r];
    kr.swap(next);
  }
  return kr;
}

// Step 4 for the nb rows of a block: a (nb x R, float64) from m (nb x R); for
// HALS `a` holds the old rows on entry.
template <typename T>
void solve_rows(const PassArgs<T>& args, const double* m, std::int64_t nb, double* a) {
  const int R = args.rank;
  const double* g = args.g;
  const bool stacked = !args.comp_lo.empty();
  auto lo = [&](int r) { return stacked ? args.comp_lo[r] : 0; };
  auto hi = [&](int r) { return stacked ? args.comp_hi[r] : R; };
  if (args.update == static_cast<int>(Update::kAls)) {
    for (std::int64_t i = 0; i < nb; ++i)
      for (int r = 0; r < R; ++r) {
        double acc = 0.0;
        for (int k = lo(r); k < hi(r); ++k) acc += m[i * R + k] * g[k * R + r];
        a[i * R + r] = acc;
      }
    return;
  }
  for (int sweep = 0; sweep < args.sweeps; ++sweep)
    for (std::int64_t i = 0; i < nb; ++i) {
      double* ai = a + i * R;
      const double* mi = m + i * R;
      for (int r = 0; r < R; ++r) {
        double resid = mi[r];
        for (int k = lo(r); k < hi(r); ++k) resid -= ai[k] * g[k * R + r];
        ai[r] = hals_step(ai[r], resid, g[r * R + r]);
      }
    }
}

// A^T A (float64, only the models' diagonal blocks when stacked) += a^T a.
template <typename T>
void add_gram(const PassArgs<T>& args, const T* a, std::int64_t nb) {
  const int R = args.rank;
  const bool stacked = !args.comp_lo.empty();
  for (std::int64_t i = 0; i < nb; ++i)
    for (int r = 0; r < R; ++r) {
      const double ar = static_cast<double>(a[i * R + r]);
      const int k0 = stacked ? args.comp_lo[r] : 0, k1 = stacked ? args.comp_hi[r] : R;
      for (int k = k0; k < k1; ++k) args.ata[r * R + k] += ar * static_cast<double>(a[i * R + k]);
    }
}

}  // namespace

// Largest block share of one thread that the 2 R floor on the samples per
// block may ask for (bytes of decoded scratch).
constexpr std::int64_t kMaxShareBytes = std::int64_t{64} << 20;

// One OpenMP team shares every block (see the file comment); the split of the
// columns depends only on the thread count, so results are reproducible for
// a given count. BLAS runs single-threaded inside the team: one threading
// runtime does all the work, so OpenBLAS's own threads never compete with it
// for the cores.
template <typename T>
double pass_chunk(const PassArgs<T>& args) {
  const int R = args.rank;
  const int d = static_cast<int>(args.dims.size());
  if (d < 2) throw std::invalid_argument("pass_chunk needs at least two resident modes");
  if (static_cast<int>(args.factors.size()) != d)
    throw std::invalid_argument("one factor per resident mode is required");
  (void)storage_bytes(args.storage);  // validates the code
  if (args.rows == 0) return 0.0;
  const std::int64_t K = args.dims[d - 1];
  std::int64_t P = 1;
  for (int m = 0; m + 1 < d; ++m) P *= args.dims[m];
  const std::int64_t J = P * K;

  static std::once_flag blas_single;
  std::call_once(blas_single, [] { scipy_openblas_set_num_threads(1); });
  const int threads = static_cast<int>(std::min<std::int64_t>(max_threads(), P));
  // Samples per block: the block's share of one thread fills block_bytes, but
  // at least 2 R samples (with at most kMaxShareBytes of scratch): every block
  // reads and writes the thread's R rows of T once, so blocks of fewer samples
  // move more bytes of T than of X. A 64 x 112 x 112 map (J = 802,816) got
  // blocks of 2 samples from block_bytes alone.
  const std::int64_t share = (J + threads - 1) / threads;
  const std::int64_t share_bytes = share * static_cast<std::int64_t>(sizeof(T));
  const std::int64_t fill = args.block_bytes / share_bytes;
  const std::int64_t floor_rows = std::min<std::int64_t>(2 * R, kMaxShareBytes / share_bytes);
  const std::int64_t bs = std::clamp<std::int64_t>(std::max(fill, floor_rows), 1, args.rows);
  const std::int64_t blocks = (args.rows + bs - 1) / bs;

  const std::vector<T> kr = khatri_rao_leading(args);
  const LastModeProduct<T> last_mode(args.factors[d - 1], K, R);
  // Partial MTTKRP rows of every thread, double-buffered by block parity: a
  // thread writes block b + 1's while the others may still read block b's.
  std::vector<double> m_part(static_cast<std::size_t>(2 * threads * bs * R));
  std::vector<double> norms(static_cast<std::size_t>(threads), 0.0);

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#ifdef _OPENMP
    // the team may be smaller than asked for (omp_set_dynamic, thread limits)
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int tid = 0, team = 1;
#endif
    const std::int64_t p0 = P * tid / team, p1 = P * (tid + 1) / team;
    const std::int64_t c0 = p0 * K, width = (p1 - p0) * K;
    ColumnT<T> t_cols(R, J, c0, c0 + width, args.t_acc);
    T* xbuf = thread_buffer<T>(0, static_cast<std::size_t>(bs * width));
    T* w = thread_buffer<T>(1, static_cast<std::size_t>(bs * (p1 - p0) * R));
    T* a_t = thread_buffer<T>(2, static_cast<std::size_t>(bs * R));
    std::vector<double> m(static_cast<std::size_t>(bs * R)), a(m.size());
    double norm2 = 0.0;
    for (std::int64_t blk = 0; blk < blocks; ++blk) {
      const std::int64_t r0 = blk * bs, nb = std::min(bs, args.rows - r0);
      // 1. this thread's columns of the block (copied even when the stored type
      // is the compute type: measured faster than reading the chunk in place)
      for (std::int64_t i = 0; i < nb; ++i)
        decode_block(args.chunk, args.storage, (r0 + i) * J + c0, width, xbuf + i * width);
      if (args.want_norm) norm2 += sum_squares(xbuf, nb * width);
      // 2. W (nb * P_t x R)
      last_mode.apply(xbuf, nb * (p1 - p0), w);
      // 3. M_t (nb x R) = sum_p W[i, p, :] * KR[p0 + p, :]
      double* mine = m_part.data() + ((blk & 1) * team + tid) * bs * R;
      for (std::int64_t i = 0; i < nb; ++i) {
        T* acc = a_t;  // scratch row
        std::fill(acc, acc + R, T(0));
        for (std::int64_t p = 0; p < p1 - p0; ++p) {
          const T* wr = w + (i * (p1 - p0) + p) * R;
          const T* kp = kr.data() + (p0 + p) * R;
          for (int r = 0; r < R; ++r) acc[r] += wr[r] * kp[r];
        }
        for (int r = 0; r < R; ++r) mine[i * R + r] = static_cast<double>(acc[r]);
      }
      if (args.update != static_cast<int>(Update::kAls))  // HALS starts from the old rows,
        for (std::int64_t k = 0; k < nb * R; ++k)         // read before thread 0 rewrites them
          a[k] = static_cast<double>(args.a_rows[r0 * R + k]);
#pragma omp barrier
      // 4. M in a fixed order, then the rows; every thread gets the same A_blk
      const double* parts = m_part.data() + (blk & 1) * team * bs * R;
      for (std::int64_t k = 0; k < nb * R; ++k) {
        double sum = 0.0;
        for (int t = 0; t < team; ++t) sum += parts[t * bs * R + k];
        m[k] = sum;
      }
      solve_rows(args, m.data(), nb, a.data());
      for (std::int64_t k = 0; k < nb * R; ++k) a_t[k] = static_cast<T>(a[k]);
      if (tid == 0) {
        std::copy(a_t, a_t + nb * R, args.a_rows + r0 * R);
        add_gram(args, a_t, nb);  // from the rounded rows the model holds
      }
      // 5. T[:, c0:c0+width] += A_blk^T X_blk,t
      t_cols.add(a_t, xbuf, nb);
    }
    t_cols.flush();
    norms[tid] = norm2;
  }
  double norm2 = 0.0;
  for (double n : norms) norm2 += n;
  return norm2;
}

void hals_rows(double* f, const double* m, const double* g, std::int64_t rows, int R, int sweeps,
               const std::vector<int>& comp_lo, const std::vector<int>& comp_hi) {
  const bool stacked = !comp_lo.empty();
  // Rows are independent: the sweep order within a row is what HALS fixes.
#pragma omp parallel for schedule(static) if (rows * R * R * sweeps > (1 << 16))
  for (std::int64_t i = 0; i < rows; ++i) {
    double* fi = f + i * R;
    const double* mi = m + i * R;
    for (int s = 0; s < sweeps; ++s)
      for (int r = 0; r < R; ++r) {
        double resid = mi[r];
        const int k0 = stacked ? comp_lo[r] : 0;
        const int k1 = stacked ? comp_hi[r] : R;
        for (int k = k0; k < k1; ++k) resid -= fi[k] * g[k * R + r];
        fi[r] = hals_step(fi[r], resid, g[r * R + r]);
      }
  }
}

template double pass_chunk<float>(const PassArgs<float>&);
template double pass_chunk<double>(const PassArgs<double>&);

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int openmp_version() {
#ifdef _OPENMP
  return _OPENMP;
#else
  return 0;
#endif
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

const char* blas_config() { return scipy_openblas_get_config(); }

const char* cpu_kernels() {
#ifdef PEEK_X86
  if (cpu_has_avx512f()) return "avx512";
#endif
  return "blas";
}

}  // namespace peekcore
