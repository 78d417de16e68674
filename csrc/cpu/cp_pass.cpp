// CPU implementation of the per-chunk pass (declared in cp_pass.h).
//
// The chunk is processed in blocks of samples small enough to stay in cache
// (block_bytes after decoding). For each block:
//   1. copy / decode the block into a per-thread buffer of T (F16C for half),
//   2. W = X_blk (bs*P x I_d) @ F_d (I_d x R)          BLAS gemm, P = I_1..I_{d-1}
//   3. M = W reduced over I_{d-1} .. I_1 with F_m      O(bs * P * R), elementwise
//   4. A_blk from M: ALS  A = M G^-1 (float64), or HALS sweeps on the old rows
//   5. T += A_blk^T X_blk             AVX-512 register-blocked kernel (else BLAS),
//                                     block still in cache
// so each sample is read from main memory once per iteration. Threads take
// whole blocks; see pass_chunk.
#include "cp_pass.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <type_traits>

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
// when nb is a few dozen; this register-blocked kernel streams X once: a tile
// of T (8 rows x 32 columns) stays in 16 AVX-512 registers while the block's
// rows of X go by. Chosen at run time when the CPU has AVX-512F.
#ifdef PEEK_X86
template <int RB>
__attribute__((target("avx512f"))) void outer_rows_avx512(const float* a, int R, int r0,
                                                          const float* x, std::int64_t nb,
                                                          std::int64_t J, std::int64_t j0,
                                                          float* t) {
  __m512 acc[RB][2];
  for (int r = 0; r < RB; ++r) {
    acc[r][0] = _mm512_loadu_ps(t + (r0 + r) * J + j0);
    acc[r][1] = _mm512_loadu_ps(t + (r0 + r) * J + j0 + 16);
  }
  for (std::int64_t i = 0; i < nb; ++i) {
    const __m512 x0 = _mm512_loadu_ps(x + i * J + j0);
    const __m512 x1 = _mm512_loadu_ps(x + i * J + j0 + 16);
    const float* ai = a + i * R + r0;
    for (int r = 0; r < RB; ++r) {
      const __m512 av = _mm512_set1_ps(ai[r]);
      acc[r][0] = _mm512_fmadd_ps(av, x0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, x1, acc[r][1]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    _mm512_storeu_ps(t + (r0 + r) * J + j0, acc[r][0]);
    _mm512_storeu_ps(t + (r0 + r) * J + j0 + 16, acc[r][1]);
  }
}

// The last R % 8 rows of T, by their count.
using RowsFn = void (*)(const float*, int, int, const float*, std::int64_t, std::int64_t,
                        std::int64_t, float*);
constexpr RowsFn kRemainderRows[8] = {
    nullptr,
    outer_rows_avx512<1>,
    outer_rows_avx512<2>,
    outer_rows_avx512<3>,
    outer_rows_avx512<4>,
    outer_rows_avx512<5>,
    outer_rows_avx512<6>,
    outer_rows_avx512<7>,
};

__attribute__((target("avx512f"))) void outer_acc_avx512(const float* a, int R, const float* x,
                                                         std::int64_t nb, std::int64_t J,
                                                         float* t) {
  const std::int64_t J32 = J - J % 32;
  for (std::int64_t j0 = 0; j0 < J32; j0 += 32) {
    int r0 = 0;
    for (; r0 + 8 <= R; r0 += 8) outer_rows_avx512<8>(a, R, r0, x, nb, J, j0, t);
    if (r0 < R) kRemainderRows[R - r0](a, R, r0, x, nb, J, j0, t);
  }
  for (int r = 0; r < R; ++r)  // remaining columns
    for (std::int64_t i = 0; i < nb; ++i) {
      const float ar = a[i * R + r];
      for (std::int64_t j = J32; j < J; ++j) t[r * J + j] += ar * x[i * J + j];
    }
}

bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#endif

// T += A^T X: the AVX-512 kernel for float where available, else BLAS.
template <typename T>
void outer_accumulate(const T* a, int R, const T* x, std::int64_t nb, std::int64_t J, T* t) {
#ifdef PEEK_X86
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx512f()) {
      outer_acc_avx512(a, R, x, nb, J, t);
      return;
    }
  }
#endif
  gemm(CblasTrans, CblasNoTrans, R, J, nb, T(1), a, R, x, J, T(1), t, J);
}

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

// Decode n elements starting at element offset `first` of the chunk into dst,
// in parallel slices. Returns nothing; dst is fully written.
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

// Per-thread scratch for one block of samples.
template <typename T>
struct BlockScratch {
  std::vector<T> xbuf, w0, w1, a_t;
  std::vector<double> m, a;
  BlockScratch(std::int64_t bs, std::int64_t J, std::int64_t P, int R)
      : xbuf(static_cast<std::size_t>(bs * J)),
        w0(static_cast<std::size_t>(bs * P * R)),
        w1(static_cast<std::size_t>(bs * P * R)),
        a_t(static_cast<std::size_t>(bs * R)),
        m(static_cast<std::size_t>(bs * R)),
        a(static_cast<std::size_t>(bs * R)) {}
};

// Steps 1-5 of the file comment for samples [r0, r0 + nb); single-threaded.
template <typename T>
double process_block(const PassArgs<T>& args, std::int64_t r0, std::int64_t nb, std::int64_t J,
                     std::int64_t P, BlockScratch<T>& s, T* t_acc, double* ata) {
  const int R = args.rank;
  const int d = static_cast<int>(args.dims.size());
  const std::int64_t I_last = args.dims[d - 1];
  // Copy (or decode) the block into the thread's buffer even when the stored
  // type is the compute type: one sequential read of the source, then both
  // contractions on hot memory (measured faster than reading float32 chunks in
  // place: 0.072 s against 0.10 s per iteration at 2,000 x 256 x 196, R = 16).
  decode_block(args.chunk, args.storage, r0 * J, nb * J, s.xbuf.data());
  const T* xb = s.xbuf.data();
  const double norm2 = args.want_norm ? sum_squares(xb, nb * J) : 0.0;

  // 2. W (nb*P x R) = X_blk (nb*P x I_d) @ F_d (I_d x R)
  gemm(CblasNoTrans, CblasNoTrans, nb * P, R, I_last, T(1), xb, I_last, args.factors[d - 1], R,
       T(0), s.w0.data(), R);

  // 3. reduce the remaining resident modes, last to first:
  //    out[q, r] = sum_i in[q, i, r] * F_m[i, r]
  std::int64_t outer = nb * P;
  T* cur = s.w0.data();
  T* nxt = s.w1.data();
  for (int mode = d - 2; mode >= 0; --mode) {
    const std::int64_t I = args.dims[mode];
    const T* F = args.factors[mode];
    outer /= I;
    for (std::int64_t q = 0; q < outer; ++q) {
      T* out = nxt + q * R;
      for (int r = 0; r < R; ++r) out[r] = T(0);
      const T* in = cur + q * I * R;
      for (std::int64_t i = 0; i < I; ++i) {
        const T* row = in + i * R;
        const T* f = F + i * R;
        for (int r = 0; r < R; ++r) out[r] += row[r] * f[r];
      }
    }
    std::swap(cur, nxt);
  }
  // cur now holds M (nb x R)
  for (std::int64_t i = 0; i < nb * R; ++i) s.m[i] = static_cast<double>(cur[i]);

  // 4. sample-mode rows of the block, in float64
  const double* g = args.g;
  const bool stacked = !args.comp_lo.empty();
  auto lo = [&](int r) { return stacked ? args.comp_lo[r] : 0; };
  auto hi = [&](int r) { return stacked ? args.comp_hi[r] : R; };
  if (args.update == static_cast<int>(Update::kAls)) {
    for (std::int64_t i = 0; i < nb; ++i)
      for (int r = 0; r < R; ++r) {
        double acc = 0.0;
        for (int k = lo(r); k < hi(r); ++k) acc += s.m[i * R + k] * g[k * R + r];
        s.a[i * R + r] = acc;
      }
  } else {
    const T* old = args.a_rows + r0 * R;
    for (std::int64_t i = 0; i < nb * R; ++i) s.a[i] = static_cast<double>(old[i]);
    for (int sweep = 0; sweep < args.sweeps; ++sweep)
      for (std::int64_t i = 0; i < nb; ++i) {
        double* ai = s.a.data() + i * R;
        const double* mi = s.m.data() + i * R;
        for (int r = 0; r < R; ++r) {
          double resid = mi[r];
          for (int k = lo(r); k < hi(r); ++k) resid -= ai[k] * g[k * R + r];
          ai[r] = hals_step(ai[r], resid, g[r * R + r]);
        }
      }
  }
  T* dst = args.a_rows + r0 * R;
  for (std::int64_t i = 0; i < nb * R; ++i) {
    dst[i] = static_cast<T>(s.a[i]);
    s.a_t[i] = dst[i];
  }
  // A^T A in float64 from the rounded rows the model actually holds
  for (std::int64_t i = 0; i < nb; ++i)
    for (int r = 0; r < R; ++r) {
      const double ar = static_cast<double>(s.a_t[i * R + r]);
      for (int k = lo(r); k < hi(r); ++k)
        ata[r * R + k] += ar * static_cast<double>(s.a_t[i * R + k]);
    }

  // 5. T (R x J) += A_blk^T (R x nb) @ X_blk (nb x J), while X_blk is in cache
  outer_accumulate(s.a_t.data(), R, xb, nb, J, t_acc);
  return norm2;
}

}  // namespace

// Threads take contiguous runs of blocks (static schedule: the same split on
// every call, so results are reproducible for a given thread count). Each
// thread calls BLAS single-threaded and accumulates into its own T; the
// copies are summed at the end. One threading runtime (OpenMP) does all the
// work, so OpenBLAS's own threads never compete with it for the cores.
template <typename T>
double pass_chunk(const PassArgs<T>& args) {
  const int R = args.rank;
  const int d = static_cast<int>(args.dims.size());
  if (d < 2) throw std::invalid_argument("pass_chunk needs at least two resident modes");
  if (static_cast<int>(args.factors.size()) != d)
    throw std::invalid_argument("one factor per resident mode is required");
  (void)storage_bytes(args.storage);  // validates the code
  if (args.rows == 0) return 0.0;
  std::int64_t J = 1;
  for (auto n : args.dims) J *= n;
  const std::int64_t P = J / args.dims[d - 1];

  // This module's OpenBLAS copy (scipy-openblas32) serves only these calls:
  // run it single-threaded for good and parallelize over blocks instead.
  static std::once_flag blas_single;
  std::call_once(blas_single, [] { scipy_openblas_set_num_threads(1); });
  int threads = max_threads();
  std::int64_t bs =
      std::max<std::int64_t>(1, args.block_bytes / static_cast<std::int64_t>(J * sizeof(T)));
  bs = std::min(bs, (args.rows + threads - 1) / threads);  // every thread gets work
  const std::int64_t blocks = (args.rows + bs - 1) / bs;
  threads = static_cast<int>(std::min<std::int64_t>(threads, blocks));

  std::vector<std::vector<T>> t_local(static_cast<std::size_t>(threads - 1));
  std::vector<std::vector<double>> ata_local(static_cast<std::size_t>(threads),
                                             std::vector<double>(static_cast<std::size_t>(R * R)));
  std::vector<double> norms(static_cast<std::size_t>(threads), 0.0);

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    T* t_acc = args.t_acc;
    if (tid > 0) {
      t_local[tid - 1].assign(static_cast<std::size_t>(R * J), T(0));
      t_acc = t_local[tid - 1].data();
    }
    BlockScratch<T> scratch(bs, J, P, R);
    double norm2 = 0.0;
#pragma omp for schedule(static)
    for (std::int64_t blk = 0; blk < blocks; ++blk) {
      const std::int64_t r0 = blk * bs;
      const std::int64_t nb = std::min(bs, args.rows - r0);
      norm2 += process_block(args, r0, nb, J, P, scratch, t_acc, ata_local[tid].data());
    }
    norms[tid] = norm2;
  }

  // Sum the per-thread copies of T into the output, in parallel over columns.
  if (threads > 1) {
    const std::int64_t total = R * J;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (std::int64_t j = 0; j < total; ++j) {
      T acc = args.t_acc[j];
      for (const auto& tl : t_local) acc += tl[j];
      args.t_acc[j] = acc;
    }
  }
  double norm2 = 0.0;
  for (int t = 0; t < threads; ++t) {
    norm2 += norms[t];
    for (int k = 0; k < R * R; ++k) args.ata[k] += ata_local[t][k];
  }
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

}  // namespace peekcore
