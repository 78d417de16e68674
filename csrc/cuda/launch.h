// Host-side launchers of the kernels in cp_pass.cu, for the pybind11
// extension built with -DPEEKCORE_CUDA=ON (peekcore._core.cuda_*). CuPy's
// RawModule launches the same kernels when it is installed; these let the
// engine run without CuPy. Pointers are device addresses. Python computes
// every launch's shape (peekcore/kernels/cuda_launch.py, for both backends);
// these only launch. Each returns a cudaError_t (0 = success;
// cudaErrorInvalidValue for a storage type the kernel has no instance of).
#pragma once

#include <cstddef>
#include <cstdint>

namespace peekcore {
namespace cuda {

// Grid (x, y) and block of a launch, its dynamic shared memory, and the
// cudaStream_t as an integer.
struct Shape {
  unsigned grid_x = 1, grid_y = 1, block = 256;
  std::size_t shared = 0;
  std::uintptr_t stream = 0;
};

// `storage` is a peekcore::Storage code: the type of the template instance.
int sum_squares(int storage, std::uintptr_t x, long long n, std::uintptr_t out, const Shape& s);
int khatri_rao(int storage, std::uintptr_t factor_ptrs, std::uintptr_t dims, int d, int R,
               long long J, std::uintptr_t scale, int terms, std::uintptr_t out, const Shape& s);
int update_rows(int storage, std::uintptr_t m, int m_cols, std::uintptr_t inv_scale,
                std::uintptr_t g, std::uintptr_t offsets, int R, long long rows, int hals,
                int sweeps, std::uintptr_t a, const Shape& s);
int split_rows(int storage, std::uintptr_t a, std::uintptr_t scale, int R, long long rows,
               int terms, std::uintptr_t out, const Shape& s);
int add_split(std::uintptr_t p, std::uintptr_t inv_scale, int R, long long J, int terms,
              std::uintptr_t t, const Shape& s);
const char* error_string(int code);

}  // namespace cuda
}  // namespace peekcore
