// libpeekcore's driver: the Python solver's iteration for one model
// (peekcore/solvers/iteration.py, step) around the same per-chunk pass
// (cp_pass.cpp). One iteration:
//   1. Grams G_m = F_m^T F_m of the resident factors (R x R, float64) and
//      their Hadamard product G; ALS passes G^-1 (after the noise floor of
//      resident.py's with_noise_floor), HALS passes G;
//   2. the pass over every chunk: the chunk's rows of A are solved, and
//      T += A_b^T X_b (R x J), AtA += A_b^T A_b accumulate;
//   3. each resident factor in turn from its MTTKRP (T contracted with the
//      other resident factors) and AtA o prod_{k != m} G_k: a Cholesky solve
//      (ALS) or `sweeps` HALS sweeps (hals_rows, as the Python package);
//   4. ||X - M||^2 = ||X||^2 - 2 <X, M> + ||M||^2 from the last MTTKRP and
//      the Grams; the first pass measures ||X||^2 and vets the data.
// Not here (Python only): dead-component re-seeding of HALS, checkpoints,
// several models per pass, GPUs.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>

#include "cp_pass.h"
#include "peekcore/pass_math.h"
#include "peekcore/peekcore.hpp"

namespace peekcore {
namespace {

using Mat = std::vector<double>;  // row-major

constexpr std::int64_t kDefaultChunkBytes = 64 << 20;
constexpr std::int64_t kBlockBytes = 4 << 20;  // the Python NativeKernel's default
constexpr std::int64_t kMinLeadingRows = 64;   // native.py MIN_LEADING_ROWS
constexpr double kNoiseFloorUlps = 10.0;       // resident.py NOISE_FLOOR_ULPS
constexpr double kNoiseFloorFull = 1e-3;       // resident.py NOISE_FLOOR_FULL

// Lower Cholesky factor of an n x n SPD matrix in place; false if not positive definite.
bool cholesky(Mat& a, int n) {
  for (int j = 0; j < n; ++j) {
    double d = a[j * n + j];
    for (int k = 0; k < j; ++k) d -= a[j * n + k] * a[j * n + k];
    if (!(d > 0.0)) return false;
    d = std::sqrt(d);
    a[j * n + j] = d;
    for (int i = j + 1; i < n; ++i) {
      double s = a[i * n + j];
      for (int k = 0; k < j; ++k) s -= a[i * n + k] * a[j * n + k];
      a[i * n + j] = s / d;
    }
    for (int k = j + 1; k < n; ++k) a[j * n + k] = 0.0;
  }
  return true;
}

// x <- x (L L^T)^-1 for each of `rows` rows of x (rows x n): solves G y = x_i^T.
void cholesky_solve_rows(const Mat& l, int n, double* x, std::int64_t rows) {
  for (std::int64_t i = 0; i < rows; ++i) {
    double* v = x + i * n;
    for (int j = 0; j < n; ++j) {  // L z = v
      double s = v[j];
      for (int k = 0; k < j; ++k) s -= l[j * n + k] * v[k];
      v[j] = s / l[j * n + j];
    }
    for (int j = n - 1; j >= 0; --j) {  // L^T y = z
      double s = v[j];
      for (int k = j + 1; k < n; ++k) s -= l[k * n + j] * v[k];
      v[j] = s / l[j * n + j];
    }
  }
}

// Cholesky factor of g, with a ridge of 1e-12 of the mean diagonal when g is singular
// (the Python package takes a pseudo-inverse there).
Mat factor_spd(const Mat& g, int n) {
  Mat l = g;
  if (cholesky(l, n)) return l;
  double mean = 0.0;
  for (int i = 0; i < n; ++i) mean += g[i * n + i] / n;
  l = g;
  for (int i = 0; i < n; ++i) l[i * n + i] += 1e-12 * std::max(mean, 1e-300);
  if (!cholesky(l, n))
    throw std::runtime_error(
        "peekcore: the Gram matrix of the ALS update is singular (a factor "
        "holds a zero or repeated column); fit a lower rank");
  return l;
}

// resident.py with_noise_floor: raise the diagonal of an ALS Gram the statistics
// cannot resolve (float32 accumulation); a no-op in effect for float64.
Mat with_noise_floor(const Mat& g, int n, double eps) {
  std::vector<double> scale(n);
  for (int i = 0; i < n; ++i)
    scale[i] = 1.0 / std::sqrt(std::max(g[i * n + i], std::numeric_limits<double>::min()));
  Mat unit(n * n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      unit[i * n + j] = g[i * n + j] * scale[i] * scale[j] + (i == j ? 1e-12 : 0.0);
  double smallest = 1.0;
  if (cholesky(unit, n)) {
    for (int i = 0; i < n; ++i) smallest = std::min(smallest, unit[i * n + i] * unit[i * n + i]);
  } else {
    smallest = std::numeric_limits<double>::min();
  }
  const double weight = std::min(eps / smallest / kNoiseFloorFull, 1.0);
  Mat out = g;
  for (int i = 0; i < n; ++i) out[i * n + i] += g[i * n + i] * (kNoiseFloorUlps * eps) * weight;
  return out;
}

Mat gram(const Mat& f, std::int64_t rows, int R) {
  Mat g(R * R, 0.0);
  for (std::int64_t i = 0; i < rows; ++i)
    for (int a = 0; a < R; ++a)
      for (int b = 0; b < R; ++b) g[a * R + b] += f[i * R + a] * f[i * R + b];
  return g;
}

// MTTKRP of resident mode m from T (R x J, J = prod dims, row-major, last mode fastest):
// out[i_m, r] = sum over the other indices of T[r, i] prod_{k != m} F_k[i_k, r].
Mat resident_mttkrp(const Mat& t, const std::vector<Mat>& f, const std::vector<std::int64_t>& dims,
                    int m, int R) {
  const int d = static_cast<int>(dims.size());
  const std::int64_t J = t.size() / R;
  Mat out(dims[m] * R, 0.0);
  std::vector<std::int64_t> idx(d, 0);
  for (std::int64_t j = 0; j < J; ++j) {
    for (int r = 0; r < R; ++r) {
      double p = t[r * J + j];
      for (int k = 0; k < d; ++k)
        if (k != m) p *= f[k][idx[k] * R + r];
      out[idx[m] * R + r] += p;
    }
    for (int k = d - 1; k >= 0; --k) {  // next multi-index, the last mode fastest
      if (++idx[k] < dims[k]) break;
      idx[k] = 0;
    }
  }
  return out;
}

// native.py trailing_start: where the group of trailing modes merged for the pass starts.
int trailing_start(const std::vector<std::int64_t>& dims, int threads) {
  const std::int64_t need = std::max<std::int64_t>(kMinLeadingRows, 4 * threads);
  std::int64_t lead = 1;
  for (std::size_t t = 1; t < dims.size(); ++t) {
    lead *= dims[t - 1];
    if (lead >= need) return static_cast<int>(t);
  }
  return static_cast<int>(dims.size()) - 1;
}

float decode(const void* p, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::kFloat16:
      return half_bits_to_float(static_cast<const std::uint16_t*>(p)[i]);
    case DType::kBFloat16:
      return bf16_bits_to_float(static_cast<const std::uint16_t*>(p)[i]);
    case DType::kFloat32:
      return static_cast<const float*>(p)[i];
    default:
      return static_cast<float>(static_cast<const double*>(p)[i]);
  }
}

void check_nonnegative(const void* p, DType dtype, std::int64_t rows, std::int64_t J,
                       std::int64_t start) {
  for (std::int64_t i = 0; i < rows; ++i)
    for (std::int64_t j = 0; j < J; ++j)
      if (decode(p, dtype, i * J + j) < 0.0f)
        throw std::invalid_argument("peekcore::ncp_hals needs nonnegative data, but sample " +
                                    std::to_string(start + i) +
                                    " holds negative values; use cp_als for signed data");
}

void check_arguments(const Data& data, int R, const Options& opt) {
  const auto& s = data.shape;
  if (s.size() < 3)
    throw std::invalid_argument("peekcore: data.shape must be N x I_1 x ... x I_d with d >= 2 (" +
                                std::to_string(s.size()) + " modes given)");
  for (auto n : s)
    if (n <= 0) throw std::invalid_argument("peekcore: every mode of data.shape must be >= 1");
  if (!data.read) throw std::invalid_argument("peekcore: data.read is not set");
  if (R < 1) throw std::invalid_argument("peekcore: rank must be >= 1");
  if (opt.n_iter_max < 1) throw std::invalid_argument("peekcore: n_iter_max must be >= 1");
  if (!(opt.tol >= 0.0)) throw std::invalid_argument("peekcore: tol must be >= 0");
  if (opt.sweeps < 1) throw std::invalid_argument("peekcore: sweeps must be >= 1");
  if (!opt.init.empty()) {
    if (opt.init.size() != s.size())
      throw std::invalid_argument("peekcore: options.init needs one factor per mode (" +
                                  std::to_string(s.size()) + ")");
    for (std::size_t m = 0; m < s.size(); ++m)
      if (static_cast<std::int64_t>(opt.init[m].size()) != s[m] * R)
        throw std::invalid_argument("peekcore: options.init[" + std::to_string(m) +
                                    "] must hold I_m x rank = " + std::to_string(s[m] * R) +
                                    " values");
  }
}

// model.py normalize_factors: unit columns, weights, deterministic signs, sorted by weight.
void normalize(Result& res) {
  const int R = res.rank;
  std::vector<double> w(R, 1.0);
  for (std::size_t m = 0; m < res.factors.size(); ++m) {
    Mat& f = res.factors[m];
    const std::int64_t rows = res.shape[m];
    for (int r = 0; r < R; ++r) {
      double n2 = 0.0;
      for (std::int64_t i = 0; i < rows; ++i) n2 += f[i * R + r] * f[i * R + r];
      const double norm = std::sqrt(n2);
      const double safe = norm > 0.0 ? norm : 1.0;
      for (std::int64_t i = 0; i < rows; ++i) f[i * R + r] /= safe;
      w[r] *= norm;
    }
  }
  auto flip = [&](std::size_t m, int r) {
    for (std::int64_t i = 0; i < res.shape[m]; ++i) res.factors[m][i * R + r] *= -1.0;
  };
  for (std::size_t m = 1; m < res.factors.size(); ++m)
    for (int r = 0; r < R; ++r) {
      double cubes = 0.0;
      for (std::int64_t i = 0; i < res.shape[m]; ++i)
        cubes += std::pow(res.factors[m][i * R + r], 3);
      if (cubes < 0.0) {
        flip(m, r);
        flip(0, r);
      }
    }
  for (int r = 0; r < R; ++r)
    if (w[r] < 0.0) {
      w[r] = -w[r];
      flip(0, r);
    }
  std::vector<int> order(R);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return w[a] > w[b]; });
  res.weights.resize(R);
  for (int r = 0; r < R; ++r) res.weights[r] = w[order[r]];
  for (std::size_t m = 0; m < res.factors.size(); ++m) {
    Mat sorted(res.factors[m].size());
    for (std::int64_t i = 0; i < res.shape[m]; ++i)
      for (int r = 0; r < R; ++r) sorted[i * R + r] = res.factors[m][i * R + order[r]];
    res.factors[m] = std::move(sorted);
  }
}

template <typename T>
Result fit(const Data& data, int R, const Options& opt, Update method) {
  check_arguments(data, R, opt);
  const bool hals = method == Update::kHals;
  const std::int64_t N = data.shape[0];
  const std::vector<std::int64_t> dims(data.shape.begin() + 1, data.shape.end());
  const int d = static_cast<int>(dims.size());
  const std::int64_t J =
      std::accumulate(dims.begin(), dims.end(), std::int64_t(1), std::multiplies<std::int64_t>());
  const std::int64_t chunk_rows =
      opt.chunk_rows > 0
          ? opt.chunk_rows
          : std::max<std::int64_t>(1, kDefaultChunkBytes / (J * dtype_size(data.dtype)));
  const double eps = std::numeric_limits<T>::epsilon();  // rounding of the pass's sums

  // the model: A (N x R, compute type) and the resident factors (float64)
  std::vector<T> a(N * R);
  std::vector<Mat> f(d);
  if (!opt.init.empty()) {
    for (std::int64_t i = 0; i < N * R; ++i) a[i] = static_cast<T>(opt.init[0][i]);
    for (int m = 0; m < d; ++m) f[m] = opt.init[m + 1];
    if (hals)
      for (const auto& v : opt.init)
        if (std::any_of(v.begin(), v.end(), [](double x) { return x < 0.0; }))
          throw std::invalid_argument("peekcore::ncp_hals needs nonnegative initial factors");
  } else {
    std::mt19937_64 gen(opt.seed);
    std::normal_distribution<double> normal;
    std::uniform_real_distribution<double> uniform;
    auto draw = [&] { return hals ? uniform(gen) : normal(gen); };
    for (auto& v : a) v = static_cast<T>(draw());
    for (int m = 0; m < d; ++m) {
      f[m].resize(dims[m] * R);
      for (auto& v : f[m]) v = draw();
    }
  }

  // the pass contracts the trailing modes as one (their Khatri-Rao product)
  const int t0 = trailing_start(dims, max_threads());
  std::vector<std::int64_t> pass_dims(dims.begin(), dims.begin() + t0);
  pass_dims.push_back(std::accumulate(dims.begin() + t0, dims.end(), std::int64_t(1),
                                      std::multiplies<std::int64_t>()));

  Result res;
  res.shape = data.shape;
  res.rank = R;
  double norm2 = -1.0;
  std::vector<T> t_acc(R * J);
  for (int it = 0; it < opt.n_iter_max; ++it) {
    const auto start_time = std::chrono::steady_clock::now();
    std::vector<Mat> grams(d);
    Mat g_full(R * R, 1.0);
    for (int m = 0; m < d; ++m) {
      grams[m] = gram(f[m], dims[m], R);
      for (int i = 0; i < R * R; ++i) g_full[i] *= grams[m][i];
    }
    Mat g = g_full;
    if (!hals) {  // G^-1 by Cholesky
      const Mat l = factor_spd(with_noise_floor(g_full, R, eps), R);
      g.assign(R * R, 0.0);
      for (int i = 0; i < R; ++i) g[i * R + i] = 1.0;
      cholesky_solve_rows(l, R, g.data(), R);
    }
    std::vector<std::vector<T>> pass_factors;
    for (int m = 0; m < t0; ++m) pass_factors.emplace_back(f[m].begin(), f[m].end());
    Mat merged = f[t0];  // Khatri-Rao product of the trailing factors, formed in float64
    std::int64_t merged_rows = dims[t0];
    for (int m = t0 + 1; m < d; ++m) {
      Mat next(merged_rows * dims[m] * R);
      for (std::int64_t i = 0; i < merged_rows; ++i)
        for (std::int64_t k = 0; k < dims[m]; ++k)
          for (int r = 0; r < R; ++r)
            next[(i * dims[m] + k) * R + r] = merged[i * R + r] * f[m][k * R + r];
      merged = std::move(next);
      merged_rows *= dims[m];
    }
    pass_factors.emplace_back(merged.begin(), merged.end());

    std::fill(t_acc.begin(), t_acc.end(), T(0));
    Mat ata(R * R, 0.0);
    const bool want_norm = norm2 < 0.0;
    double total = 0.0;
    for (std::int64_t s = 0; s < N; s += chunk_rows) {
      const std::int64_t rows = std::min(chunk_rows, N - s);
      const void* chunk = data.read(s, rows);
      if (chunk == nullptr) throw std::runtime_error("peekcore: data.read returned no data");
      if (want_norm && hals) check_nonnegative(chunk, data.dtype, rows, J, s);
      PassArgs<T> args;
      args.chunk = chunk;
      args.storage = static_cast<int>(data.dtype);
      args.rows = rows;
      args.dims = pass_dims;
      for (const auto& pf : pass_factors) args.factors.push_back(pf.data());
      args.g = g.data();
      args.a_rows = a.data() + s * R;
      args.t_acc = t_acc.data();
      args.ata = ata.data();
      args.rank = R;
      args.update = static_cast<int>(method);
      args.sweeps = opt.sweeps;
      args.want_norm = want_norm;
      args.block_bytes = kBlockBytes;
      const double n2 = pass_chunk<T>(args);
      if (want_norm) {
        if (!std::isfinite(n2))
          throw std::invalid_argument("peekcore: the data holds NaN or Inf in samples " +
                                      std::to_string(s) + ".." + std::to_string(s + rows - 1));
        total += n2;
      }
    }
    if (want_norm) {
      if (total == 0.0) throw std::invalid_argument("peekcore: the data is all zeros");
      norm2 = total;
    }

    const Mat t(t_acc.begin(), t_acc.end());
    Mat mt;
    for (int m = 0; m < d; ++m) {
      mt = resident_mttkrp(t, f, dims, m, R);
      Mat gm = ata;
      for (int k = 0; k < d; ++k)
        if (k != m)
          for (int i = 0; i < R * R; ++i) gm[i] *= grams[k][i];
      if (hals) {
        hals_rows(f[m].data(), mt.data(), gm.data(), dims[m], R, opt.sweeps, {});
      } else {
        f[m] = mt;
        cholesky_solve_rows(factor_spd(with_noise_floor(gm, R, eps), R), R, f[m].data(), dims[m]);
      }
      grams[m] = gram(f[m], dims[m], R);
    }
    double inner = 0.0, model2 = 0.0;
    for (std::size_t i = 0; i < mt.size(); ++i) inner += mt[i] * f[d - 1][i];
    for (int i = 0; i < R * R; ++i) {
      double p = ata[i];
      for (int m = 0; m < d; ++m) p *= grams[m][i];
      model2 += p;
    }
    const double resid2 = norm2 - 2.0 * inner + model2;
    if (!std::isfinite(resid2))
      throw std::runtime_error("peekcore: the fit became non-finite at iteration " +
                               std::to_string(it + 1) + " (try Precision::kFloat64)");
    res.fit.push_back(1.0 - std::sqrt(std::max(resid2, 0.0) / norm2));
    res.seconds.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count());
    const std::size_t k = res.fit.size();
    res.converged = k >= 2 && std::abs(res.fit[k - 1] - res.fit[k - 2]) <=
                                  opt.tol * std::max(std::abs(res.fit[k - 2]), 1e-12);
    const bool stop = opt.callback && opt.callback(it + 1, res.fit.back());  // as in Python:
    if (res.converged || stop) {  // called after the convergence test, tol wins
      res.stop_reason = res.converged ? "tol" : "callback";
      break;
    }
  }
  if (res.stop_reason.empty()) res.stop_reason = "n_iter_max";
  res.factors.emplace_back(a.begin(), a.end());
  for (auto& fm : f) res.factors.push_back(std::move(fm));
  normalize(res);
  return res;
}

Result dispatch(const Data& data, int rank, const Options& opt, Update method) {
  const bool wide = opt.precision == Precision::kFloat64 ||
                    (opt.precision == Precision::kAuto && data.dtype == DType::kFloat64);
  return wide ? fit<double>(data, rank, opt, method) : fit<float>(data, rank, opt, method);
}

}  // namespace

std::int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
  }
  throw std::invalid_argument("peekcore: unknown DType");
}

Data from_array(const void* values, DType dtype, std::vector<std::int64_t> shape) {
  Data data;
  data.dtype = dtype;
  data.shape = std::move(shape);
  std::int64_t row = dtype_size(dtype);
  for (std::size_t m = 1; m < data.shape.size(); ++m) row *= data.shape[m];
  const char* base = static_cast<const char*>(values);
  data.read = [base, row](std::int64_t start, std::int64_t) -> const void* {
    return base + start * row;
  };
  return data;
}

Result cp_als(const Data& data, int rank, const Options& options) {
  return dispatch(data, rank, options, Update::kAls);
}

Result ncp_hals(const Data& data, int rank, const Options& options) {
  return dispatch(data, rank, options, Update::kHals);
}

std::string build_info() {
  return "openmp=" + std::to_string(has_openmp() ? 1 : 0) +
         " threads=" + std::to_string(max_threads()) + " kernels=" + cpu_kernels() +
         " blas=" + blas_config();
}

}  // namespace peekcore
