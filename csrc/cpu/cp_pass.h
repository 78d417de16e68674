// The per-chunk pass of streaming CP (shared/DESIGN.md, "one pass over the
// data per ALS iteration"), CPU implementation.
//
// Input:  chunk X_b, b x J row-major, J = I_1 * ... * I_d (d >= 2 resident modes)
//         resident factors F_m, I_m x R row-major, compute type T
//         g: R x R float64, the inverse of the Hadamard Gram (ALS) or the Gram
//            itself (HALS)
// In/out: a_rows (b x R, T): the chunk's rows of the sample factor
//         t_acc (R x J, T):  T += A_b^T X_b
//         ata (R x R, double): A^T A += A_b^T A_b
// Returns the chunk's sum of squares when asked (else 0).
#pragma once

#include <cstdint>
#include <vector>

namespace peekcore {

enum class Update : int { kAls = 0, kHals = 1 };

template <typename T>
struct PassArgs {
  const void* chunk = nullptr;
  int storage = 0;  // peekcore::Storage
  std::int64_t rows = 0;
  std::vector<std::int64_t> dims;  // I_1 .. I_d
  std::vector<const T*> factors;   // d pointers, I_m x R
  const double* g = nullptr;       // R x R
  T* a_rows = nullptr;             // rows x R
  T* t_acc = nullptr;              // R x J
  double* ata = nullptr;           // R x R
  int rank = 0;
  int update = 0;  // peekcore::Update
  int sweeps = 1;  // HALS inner sweeps
  bool want_norm = false;
  std::int64_t block_bytes = 4 << 20;  // decoded bytes of one thread's share of a block
  // Several models stacked side by side (a rank sweep): component r belongs to
  // the model whose columns are [comp_lo[r], comp_hi[r]); g and A^T A are block
  // diagonal, so the row solves and A^T A only visit that block. Empty: one model.
  std::vector<int> comp_lo, comp_hi;
};

template <typename T>
double pass_chunk(const PassArgs<T>& args);

// HALS sweeps on the rows of a factor, in place (float64):
//   f (rows x R), m (rows x R, its MTTKRP), g (R x R, its Gram).
// Column r of a row: f_r <- max(0, f_r + (m_r - sum_k f_k g_kr) / g_rr), r = 0..R-1.
// comp_hi (R, or empty for one model): where the block of column r ends when
// several models are stacked (g block diagonal), as in PassArgs.
void hals_rows(double* f, const double* m, const double* g, std::int64_t rows, int R, int sweeps,
               const std::vector<int>& comp_hi);

// Compile-time facts for build_info().
bool has_openmp();
int openmp_version();
int max_threads();
const char* blas_config();
// The contraction kernels the pass uses on this CPU (run-time detection):
// "avx512" (register-tiled kernels, float) or "blas" (OpenBLAS only).
const char* cpu_kernels();

}  // namespace peekcore
