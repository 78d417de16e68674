// Host-side launchers (see launch.h). Each picks the template instance of the
// storage type it is given, among the types the kernel is instantiated for,
// and launches it with the shape Python computed.
#include <cuda_runtime.h>

#include <type_traits>

#include "cp_pass.cu"
#include "launch.h"

namespace peekcore {
namespace cuda {
namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

template <typename T>
struct Type {
  using type = T;
};

// The peekcore::Storage code of each CUDA type.
template <typename T>
constexpr Storage storage_of() {
  if constexpr (std::is_same_v<T, __half>) {
    return Storage::kFloat16;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return Storage::kBFloat16;
  } else if constexpr (std::is_same_v<T, float>) {
    return Storage::kFloat32;
  } else {
    static_assert(std::is_same_v<T, double>, "no peekcore::Storage for this type");
    return Storage::kFloat64;
  }
}

// launch(Type<T>{}) for the T among Types whose code is `storage`, then the
// launch's error; cudaErrorInvalidValue when none matches.
template <typename... Types, typename F>
int dispatch(int storage, F&& launch) {
  bool found = false;
  ((static_cast<int>(storage_of<Types>()) == storage ? (launch(Type<Types>{}), found = true)
                                                     : false),
   ...);
  if (!found) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

dim3 grid_of(const Shape& s) { return dim3(s.grid_x, s.grid_y); }
cudaStream_t stream_of(const Shape& s) { return reinterpret_cast<cudaStream_t>(s.stream); }

}  // namespace

int sum_squares(int storage, std::uintptr_t x, long long n, std::uintptr_t out, const Shape& s) {
  return dispatch<__half, __nv_bfloat16, float, double>(storage, [&](auto t) {
    using S = typename decltype(t)::type;
    peekcore::sum_squares<S>
        <<<grid_of(s), s.block, s.shared, stream_of(s)>>>(ptr<const S>(x), n, ptr<double>(out));
  });
}

int khatri_rao(int storage, std::uintptr_t factor_ptrs, std::uintptr_t dims, int d, int R,
               long long J, std::uintptr_t scale, int terms, std::uintptr_t out, const Shape& s) {
  return dispatch<float, __half, __nv_bfloat16>(storage, [&](auto t) {
    using O = typename decltype(t)::type;
    peekcore::khatri_rao<O><<<grid_of(s), s.block, s.shared, stream_of(s)>>>(
        ptr<const unsigned long long>(factor_ptrs), ptr<const long long>(dims), d, R, J,
        ptr<const double>(scale), terms, ptr<O>(out));
  });
}

int update_rows(int storage, std::uintptr_t m, int m_cols, std::uintptr_t inv_scale,
                std::uintptr_t g, std::uintptr_t offsets, int R, long long rows, int hals,
                int sweeps, std::uintptr_t a, const Shape& s) {
  return dispatch<float, double>(storage, [&](auto t) {
    using T = typename decltype(t)::type;
    peekcore::update_rows<T, T><<<grid_of(s), s.block, s.shared, stream_of(s)>>>(
        ptr<const T>(m), m_cols, ptr<const double>(inv_scale), ptr<const double>(g),
        ptr<const int>(offsets), R, rows, hals, sweeps, ptr<T>(a));
  });
}

int split_rows(int storage, std::uintptr_t a, std::uintptr_t scale, int R, long long rows,
               int terms, std::uintptr_t out, const Shape& s) {
  return dispatch<__half, __nv_bfloat16>(storage, [&](auto t) {
    using O = typename decltype(t)::type;
    peekcore::split_rows<O><<<grid_of(s), s.block, s.shared, stream_of(s)>>>(
        ptr<const float>(a), ptr<const float>(scale), R, rows, terms, ptr<O>(out));
  });
}

int add_split(std::uintptr_t p, std::uintptr_t inv_scale, int R, long long J, int terms,
              std::uintptr_t t, const Shape& s) {
  peekcore::add_split<<<grid_of(s), s.block, s.shared, stream_of(s)>>>(
      ptr<const float>(p), ptr<const float>(inv_scale), R, J, terms, ptr<float>(t));
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace peekcore
