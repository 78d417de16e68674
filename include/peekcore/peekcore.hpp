// libpeekcore: streaming CP-ALS and nonnegative CP (HALS) on the CPU, for C++
// programs. The same per-chunk pass kernels as the Python package
// (csrc/cpu/cp_pass.cpp); the driver (csrc/cpu/fit.cpp) is the Python solver's
// iteration for one model, so a fit from the same initial factors equals
// peekcore.cp_als / peekcore.ncp_hals to rounding (tests/test_cpp_library.py).
//
// Data: N samples, each I_1 x ... x I_d (d >= 2), handed over in chunks of
// whole samples, row-major, by a callback; one pass over them per iteration.
//
//   peekcore::Data data = peekcore::from_array(ptr, peekcore::DType::kFloat32, {N, C, HW});
//   peekcore::Result r = peekcore::cp_als(data, 8);
//   r.fit.back(), r.weights, r.factors[m]  // I_m x R row-major, mode 0 the samples
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace peekcore {

// Stored type of the samples; the codes are the pass's Storage codes.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Bytes of one value of `dtype`.
std::int64_t dtype_size(DType dtype);

struct Data {
  // N, I_1, ..., I_d (d >= 2).
  std::vector<std::int64_t> shape;
  DType dtype = DType::kFloat32;
  // Samples [start, start + count), row-major: count * I_1 * ... * I_d values
  // of `dtype`. The pointer must stay valid until the next call. Called for
  // consecutive ranges from 0 to N on every pass.
  std::function<const void*(std::int64_t start, std::int64_t count)> read;
};

// Data already in memory (not copied; it must outlive the fit).
Data from_array(const void* values, DType dtype, std::vector<std::int64_t> shape);

enum class Precision : int { kAuto = 0, kFloat32 = 1, kFloat64 = 2 };

struct Options {
  int n_iter_max = 100;
  // Stop when |fit_k - fit_{k-1}| <= tol * |fit_{k-1}|.
  double tol = 1e-8;
  // HALS sweeps per factor update (ncp_hals).
  int sweeps = 5;
  // Samples per chunk; 0: about 64 MiB of stored data.
  std::int64_t chunk_rows = 0;
  // Accumulation type of the pass; kAuto: float64 for float64 data, else float32.
  Precision precision = Precision::kAuto;
  // Seed of the random start (std::mt19937_64: not numpy's draws; pass `init`
  // to reproduce a Python fit).
  std::uint64_t seed = 0;
  // Initial factors, mode 0 first, each I_m x R row-major; empty: random
  // (standard normal for cp_als, uniform [0, 1) for ncp_hals).
  std::vector<std::vector<double>> init;
  // Called after each iteration with (iteration, fit); returning true stops.
  std::function<bool(int, double)> callback;
};

struct Result {
  std::vector<double> weights;               // R, nonincreasing
  std::vector<std::vector<double>> factors;  // mode 0 first, I_m x R row-major, unit columns
  std::vector<std::int64_t> shape;           // N, I_1, ..., I_d
  int rank = 0;
  std::vector<double> fit;      // 1 - ||X - M|| / ||X|| after each iteration
  std::vector<double> seconds;  // wall time of each iteration
  bool converged = false;
  std::string stop_reason;  // "tol", "n_iter_max" or "callback"
};

// CP decomposition by alternating least squares, one streamed pass per iteration.
Result cp_als(const Data& data, int rank, const Options& options = Options());

// Nonnegative CP by HALS (nonnegative data), one streamed pass per iteration.
Result ncp_hals(const Data& data, int rank, const Options& options = Options());

// What was compiled in: "openmp=<0|1> threads=<n> kernels=<avx512|blas> blas=<config>".
std::string build_info();

}  // namespace peekcore
