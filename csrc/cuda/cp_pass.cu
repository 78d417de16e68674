// CUDA kernels of the per-chunk pass and the small resident updates.
//
// The two contractions of a chunk with R columns run in cuBLAS (through torch,
// float32 output from half inputs). These kernels do the rest:
//   sum_squares<S>     ||X_b||^2 in float64, half decoded on the fly   (first pass)
//   khatri_rao<O>      KR (J x R) of the resident factors, or its split into
//                      half terms [KR_0 | KR_1 | ...] (J x terms*R) so that a
//                      half GEMM keeps about 22 (float16, 2 terms) or 24
//                      (bfloat16, 3 terms) bits of the float64 factors
//   update_rows        rows of the factors of models side by side from their
//                      MTTKRP: ALS (M G^-1) or HALS sweeps, one thread per row
//                      and model, float64, the model's block of G in shared memory
//   split_rows<O>      A (b x R, float32) -> its half terms (b x terms*R), scaled
//   add_split          T (R x J) += (sum of the terms of P) * inv_scale  per row
// Layouts are row-major; J is the product of the resident dimensions.
// Loaded at run time by peekcore/kernels/cuda_loader.py (CuPy RawModule over
// NVRTC) and compiled by nvcc in CI (`make cuda-check`).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "peekcore/pass_math.h"

namespace peekcore {

__device__ __forceinline__ double to_double(float v) { return v; }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(__half v) { return __half2float(v); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename O>
__device__ __forceinline__ O from_double(double v);
template <>
__device__ __forceinline__ float from_double<float>(double v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ __half from_double<__half>(double v) {
  return __double2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double v) {
  return __double2bfloat16(v);
}

// Block-wide sum of one double per thread, added atomically to *out.
// Assumes blockDim.x is a multiple of 32 and at most 1024.
__device__ void block_sum_atomic(double v, double* out) {
  __shared__ double warp_sums[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) atomicAdd(out, v);
  }
}

// Input: x (n elements, stored type S). Output: *out += sum x^2 (float64).
template <typename S>
__global__ void sum_squares(const S* __restrict__ x, long long n, double* __restrict__ out) {
  double acc = 0.0;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const double v = to_double(x[i]);
    acc += v * v;
  }
  block_sum_atomic(acc, out);
}

// Write v as `terms` values of type O whose sum approximates v: hi, then the
// rounding error of hi, and so on (float16: 2 terms ~ 22 bits; bfloat16: 3
// terms ~ 24 bits). Entry t goes to out[t * stride].
template <typename O>
__device__ __forceinline__ void split_value(double v, int terms, long long stride, O* out) {
  for (int t = 0; t < terms; ++t) {
    const O part = from_double<O>(v);
    out[t * stride] = part;
    v -= to_double(part);
  }
}

// Input: factor_ptrs (d device pointers to float64 I_m x R factors), dims (d).
// Output: out, J x (terms * R): [KR_0 | KR_1 | ...] with KR = sum_t KR_t, each
// entry multiplied by scale[r] (a power of two that keeps half in range).
template <typename O>
__global__ void khatri_rao(const unsigned long long* __restrict__ factor_ptrs,
                           const long long* __restrict__ dims, int d, int R, long long J,
                           const double* __restrict__ scale, int terms, O* __restrict__ out) {
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= J * R) return;
  const long long j = idx / R;
  const int r = static_cast<int>(idx % R);
  double v = scale[r];
  long long rem = j;
  for (int m = d - 1; m >= 0; --m) {
    const long long i = rem % dims[m];
    rem /= dims[m];
    v *= reinterpret_cast<const double*>(factor_ptrs[m])[i * R + r];
  }
  split_value(v, terms, R, out + j * terms * R + r);
}

// Rows of the factors of K models side by side, from their MTTKRP, in float64:
// model k owns columns [offsets[k], offsets[k+1]) of a, m (in each term) and g,
// whose off-diagonal blocks are not read. Grid: x over rows (one thread per
// row), y over the K models; each block keeps its model's block of g in shared
// memory (8 * width^2 bytes for the widest model).
// Input: m (rows x m_cols, M_T; m_cols = terms * R, the terms are summed),
//        inv_scale (R), g (R x R float64: G^-1 for ALS, G for HALS),
//        offsets (K + 1 int, offsets[K] = R).
// In/out: a (rows x R, float32 or float64 as A_T): HALS reads the old rows.
// Assumes every model's width <= kMaxRank (the Python side falls back to torch).
constexpr int kMaxRank = 64;
template <typename M_T, typename A_T>
__global__ void update_rows(const M_T* __restrict__ m, int m_cols,
                            const double* __restrict__ inv_scale, const double* __restrict__ g,
                            const int* __restrict__ offsets, int R, long long rows, int hals,
                            int sweeps, A_T* __restrict__ a) {
  extern __shared__ double g_sh[];
  const int lo = offsets[blockIdx.y];
  const int w = offsets[blockIdx.y + 1] - lo;
  for (int e = threadIdx.x; e < w * w; e += blockDim.x) g_sh[e] = g[(lo + e / w) * R + lo + e % w];
  __syncthreads();
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const M_T* mi_row = m + i * m_cols + lo;
  A_T* ai_row = a + i * R + lo;
  double mi[kMaxRank];
  double ai[kMaxRank];
  for (int r = 0; r < w; ++r) {
    double v = 0.0;
    for (int c = r; c < m_cols; c += R) v += static_cast<double>(mi_row[c]);
    mi[r] = v * inv_scale[lo + r];
  }
  if (!hals) {
    for (int r = 0; r < w; ++r) {
      double acc = 0.0;
      for (int k = 0; k < w; ++k) acc += mi[k] * g_sh[k * w + r];
      ai[r] = acc;
    }
  } else {
    for (int r = 0; r < w; ++r) ai[r] = to_double(ai_row[r]);
    hals_sweeps(ai, mi, g_sh, w, w, sweeps);
  }
  for (int r = 0; r < w; ++r) ai_row[r] = static_cast<A_T>(ai[r]);
}

// Input: a (rows x R float32), scale (R, powers of two).
// Output: out (rows x terms*R) = the split terms of a * scale in half type O.
template <typename O>
__global__ void split_rows(const float* __restrict__ a, const float* __restrict__ scale, int R,
                           long long rows, int terms, O* __restrict__ out) {
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * R) return;
  const long long i = idx / R;
  const int r = static_cast<int>(idx % R);
  split_value(static_cast<double>(a[idx]) * scale[r], terms, R, out + i * terms * R + r);
}

// T (R x J) += (sum_t P[t * R + r]) * inv_scale[r], P (terms*R x J) float32.
// Grid: x over columns, y over the R rows (no integer division per element).
__global__ void add_split(const float* __restrict__ p, const float* __restrict__ inv_scale, int R,
                          long long J, int terms, float* __restrict__ t) {
  const int r = blockIdx.y;
  const float s = inv_scale[r];
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; j < J;
       j += stride) {
    float acc = 0.0f;
    for (int k = 0; k < terms; ++k) acc += p[(k * R + r) * J + j];
    t[r * J + j] += acc * s;
  }
}

#if !defined(__CUDACC_RTC__)
// nvcc builds (CI compile check, the pybind11 extension) instantiate what
// NVRTC instantiates by name expression.
template __global__ void sum_squares<__half>(const __half*, long long, double*);
template __global__ void sum_squares<__nv_bfloat16>(const __nv_bfloat16*, long long, double*);
template __global__ void sum_squares<float>(const float*, long long, double*);
template __global__ void sum_squares<double>(const double*, long long, double*);
template __global__ void khatri_rao<float>(const unsigned long long*, const long long*, int, int,
                                           long long, const double*, int, float*);
template __global__ void khatri_rao<__half>(const unsigned long long*, const long long*, int, int,
                                            long long, const double*, int, __half*);
template __global__ void khatri_rao<__nv_bfloat16>(const unsigned long long*, const long long*, int,
                                                   int, long long, const double*, int,
                                                   __nv_bfloat16*);
template __global__ void update_rows<float, float>(const float*, int, const double*, const double*,
                                                   const int*, int, long long, int, int, float*);
template __global__ void update_rows<double, double>(const double*, int, const double*,
                                                     const double*, const int*, int, long long, int,
                                                     int, double*);
template __global__ void split_rows<__half>(const float*, const float*, int, long long, int,
                                            __half*);
template __global__ void split_rows<__nv_bfloat16>(const float*, const float*, int, long long, int,
                                                   __nv_bfloat16*);
#endif

}  // namespace peekcore
