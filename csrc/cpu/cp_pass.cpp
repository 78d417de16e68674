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

#include "avx512.h"
#ifdef PEEK_X86
#include <immintrin.h>  // F16C decoding
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

// ---- T += A^T X for a block (see avx512.h for the packed kernel) ------------

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
// accumulated packed (strips of 16 columns, see avx512.h) and added into the
// R x J output by flush(); otherwise BLAS adds into the output directly.
template <typename T>
class ColumnT {
 public:
  ColumnT(int R, std::int64_t J, std::int64_t c0, std::int64_t c1, T* out)
      : R_(R), J_(J), c0_(c0), width_(c1 - c0), out_(out) {
#ifdef PEEK_X86
    if constexpr (std::is_same_v<T, float>) {
      if (avx512::available()) {
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
        avx512::outer_acc_packed(a, R_, x, nb, width_, packed_);
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

// ---- W = X F_d for a block (the MTTKRP's first contraction, see avx512.h) ----

// W = X F_d for every block of a pass: the kernels above for float
// on AVX-512 (narrow ones for R <= 8 where narrow_pays, else R <= 64), else BLAS.
template <typename T>
class LastModeProduct {
 public:
  LastModeProduct(const T* f, std::int64_t K, int R) : f_(f), K_(K), R_(R) {
#ifdef PEEK_X86
    if constexpr (std::is_same_v<T, float>) {
      rz_ = (R + 15) / 16;
      if (R <= avx512::kNarrowRank && avx512::narrow_pays(K, R) && avx512::available()) {
        kpad_ = (K + 15) / 16 * 16;  // F^T, zero-padded rows
        fpad_.assign(static_cast<std::size_t>(R * kpad_), 0.0f);
        for (std::int64_t k = 0; k < K; ++k)
          for (int r = 0; r < R; ++r) fpad_[r * kpad_ + k] = f[k * R + r];
      } else if (rz_ <= 4 && avx512::available()) {
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
        avx512::narrow(R_, x, n, K_, fpad_.data(), kpad_, w);
        return;
      }
      if (!fpad_.empty()) {
        avx512::last_mode(rz_, x, n, K_, fpad_.data(), R_, w);
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

// HALS sweeps on one row (R values, in place) from its MTTKRP row m and the
// R x R Gram g, model by model when several are stacked: comp_hi[r] ends the
// block of column r (empty: one model), and each block is swept alone with
// its diagonal block of g (hals_sweeps in pass_math.h, as on the GPU).
inline void hals_row(double* f, const double* m, const double* g, int R, int sweeps,
                     const std::vector<int>& comp_hi) {
  for (int lo = 0; lo < R;) {
    const int hi = comp_hi.empty() ? R : comp_hi[lo];
    hals_sweeps(f + lo, m + lo, g + lo * R + lo, R, hi - lo, sweeps);
    lo = hi;
  }
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
  for (std::int64_t i = 0; i < nb; ++i)
    hals_row(a + i * R, m + i * R, g, R, args.sweeps, args.comp_hi);
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
               const std::vector<int>& comp_hi) {
  // Rows are independent: the sweep order within a row is what HALS fixes.
#pragma omp parallel for schedule(static) if (rows * R * R * sweeps > (1 << 16))
  for (std::int64_t i = 0; i < rows; ++i) hals_row(f + i * R, m + i * R, g, R, sweeps, comp_hi);
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
  if (avx512::available()) return "avx512";
#endif
  return "blas";
}

}  // namespace peekcore
