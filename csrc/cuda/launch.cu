// Host-side launchers (see launch.h): the same grid shapes as
// peekcore/kernels/cuda.py uses through CuPy.
#include <cuda_runtime.h>

#include <algorithm>

#include "cp_pass.cu"
#include "launch.h"

namespace peekcore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
template <typename T>
inline T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
inline unsigned blocks_for(long long n, int threads) {
  return static_cast<unsigned>(std::max<long long>(1, (n + threads - 1) / threads));
}

}  // namespace

int sum_squares(int storage, std::uintptr_t x, long long n, std::uintptr_t out, int grid,
                std::uintptr_t stream) {
  const dim3 g(static_cast<unsigned>(grid)), b(kThreads);
  switch (storage) {
    case 0:
      peekcore::sum_squares<__half>
          <<<g, b, 0, as_stream(stream)>>>(ptr<const __half>(x), n, ptr<double>(out));
      break;
    case 1:
      peekcore::sum_squares<__nv_bfloat16>
          <<<g, b, 0, as_stream(stream)>>>(ptr<const __nv_bfloat16>(x), n, ptr<double>(out));
      break;
    case 2:
      peekcore::sum_squares<float>
          <<<g, b, 0, as_stream(stream)>>>(ptr<const float>(x), n, ptr<double>(out));
      break;
    default:
      peekcore::sum_squares<double>
          <<<g, b, 0, as_stream(stream)>>>(ptr<const double>(x), n, ptr<double>(out));
  }
  return static_cast<int>(cudaGetLastError());
}

int khatri_rao(int out_type, std::uintptr_t factor_ptrs, std::uintptr_t dims, int d, int R,
               long long J, std::uintptr_t scale, int terms, std::uintptr_t out,
               std::uintptr_t stream) {
  const dim3 g(blocks_for(J * R, kThreads)), b(kThreads);
  auto fp = ptr<const unsigned long long>(factor_ptrs);
  auto dp = ptr<const long long>(dims);
  auto sp = ptr<const double>(scale);
  switch (out_type) {
    case 0:
      peekcore::khatri_rao<__half>
          <<<g, b, 0, as_stream(stream)>>>(fp, dp, d, R, J, sp, terms, ptr<__half>(out));
      break;
    case 1:
      peekcore::khatri_rao<__nv_bfloat16>
          <<<g, b, 0, as_stream(stream)>>>(fp, dp, d, R, J, sp, terms, ptr<__nv_bfloat16>(out));
      break;
    default:
      peekcore::khatri_rao<float>
          <<<g, b, 0, as_stream(stream)>>>(fp, dp, d, R, J, sp, terms, ptr<float>(out));
  }
  return static_cast<int>(cudaGetLastError());
}

int update_rows(int double_rows, std::uintptr_t m, int m_cols, std::uintptr_t inv_scale,
                std::uintptr_t g, std::uintptr_t offsets, int models, int max_width, int R,
                long long rows, int hals, int sweeps, std::uintptr_t a, std::uintptr_t stream) {
  const dim3 grid(blocks_for(rows, 128), static_cast<unsigned>(models)), block(128);
  const size_t shared = sizeof(double) * max_width * max_width;
  if (double_rows) {
    peekcore::update_rows<double, double><<<grid, block, shared, as_stream(stream)>>>(
        ptr<const double>(m), m_cols, ptr<const double>(inv_scale), ptr<const double>(g),
        ptr<const int>(offsets), R, rows, hals, sweeps, ptr<double>(a));
  } else {
    peekcore::update_rows<float, float><<<grid, block, shared, as_stream(stream)>>>(
        ptr<const float>(m), m_cols, ptr<const double>(inv_scale), ptr<const double>(g),
        ptr<const int>(offsets), R, rows, hals, sweeps, ptr<float>(a));
  }
  return static_cast<int>(cudaGetLastError());
}

int split_rows(int out_type, std::uintptr_t a, std::uintptr_t scale, int R, long long rows,
               int terms, std::uintptr_t out, std::uintptr_t stream) {
  const dim3 g(blocks_for(rows * R, kThreads)), b(kThreads);
  if (out_type == 0) {
    peekcore::split_rows<__half><<<g, b, 0, as_stream(stream)>>>(
        ptr<const float>(a), ptr<const float>(scale), R, rows, terms, ptr<__half>(out));
  } else {
    peekcore::split_rows<__nv_bfloat16><<<g, b, 0, as_stream(stream)>>>(
        ptr<const float>(a), ptr<const float>(scale), R, rows, terms, ptr<__nv_bfloat16>(out));
  }
  return static_cast<int>(cudaGetLastError());
}

int add_split(std::uintptr_t p, std::uintptr_t inv_scale, int R, long long J, int terms,
              std::uintptr_t t, std::uintptr_t stream) {
  const dim3 g(std::min(blocks_for(J, kThreads), 1024u), static_cast<unsigned>(R)), b(kThreads);
  peekcore::add_split<<<g, b, 0, as_stream(stream)>>>(
      ptr<const float>(p), ptr<const float>(inv_scale), R, J, terms, ptr<float>(t));
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace peekcore
