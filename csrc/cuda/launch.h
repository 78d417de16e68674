// Host-side launchers of the kernels in cp_pass.cu, for the pybind11
// extension built with -DPEEKCORE_CUDA=ON (peekcore._core.cuda_*). CuPy's
// RawModule launches the same kernels when it is installed; these let the
// engine run without CuPy. Pointers are device addresses; `stream` is a
// cudaStream_t as an integer. Each returns a cudaError_t (0 = success).
#pragma once

#include <cstdint>

namespace peekcore {
namespace cuda {

// storage: peekcore::Storage (0 float16, 1 bfloat16, 2 float32, 3 float64)
int sum_squares(int storage, std::uintptr_t x, long long n, std::uintptr_t out, int grid,
                std::uintptr_t stream);
// out_type: 0 float16, 1 bfloat16, 2 float32
int khatri_rao(int out_type, std::uintptr_t factor_ptrs, std::uintptr_t dims, int d, int R,
               long long J, std::uintptr_t scale, int terms, std::uintptr_t out,
               std::uintptr_t stream);
// double_rows: m and a are float64 (else float32)
int update_rows(int double_rows, std::uintptr_t m, int m_cols, std::uintptr_t inv_scale,
                std::uintptr_t g, std::uintptr_t offsets, int models, int max_width, int R,
                long long rows, int hals, int sweeps, std::uintptr_t a, std::uintptr_t stream);
int split_rows(int out_type, std::uintptr_t a, std::uintptr_t scale, int R, long long rows,
               int terms, std::uintptr_t out, std::uintptr_t stream);
int add_split(std::uintptr_t p, std::uintptr_t inv_scale, int R, long long J, int terms,
              std::uintptr_t t, std::uintptr_t stream);
const char* error_string(int code);

}  // namespace cuda
}  // namespace peekcore
