// The one binding file of peekcore._core. Python (peekcore/kernels/native.py)
// prepares contiguous buffers; this file checks them and crosses into C++.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "cpu/cp_pass.h"
#ifdef PEEKCORE_WITH_CUDA
#include "cuda/launch.h"
#endif

namespace py = pybind11;

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw py::value_error(what);
}

// Ranks of models stacked side by side -> the column block of every column.
void column_blocks(const std::vector<int>& model_ranks, int R, std::vector<int>& lo,
                   std::vector<int>& hi) {
  if (model_ranks.size() <= 1) return;
  int start = 0;
  for (int rank : model_ranks) {
    for (int r = 0; r < rank; ++r) {
      lo.push_back(start);
      hi.push_back(start + rank);
    }
    start += rank;
  }
  require(start == R, "model_ranks must add up to the number of columns");
}

void require_c_contiguous(const py::array& a, const char* name) {
  require((a.flags() & py::array::c_style) != 0, std::string(name) + " must be C-contiguous");
}

template <typename T>
double run_pass(const py::array& chunk, int storage, const std::vector<std::int64_t>& dims,
                const std::vector<py::array>& factors, const py::array& g, py::array& a_rows,
                py::array& t_acc, py::array& ata, int update, int sweeps, bool want_norm,
                std::int64_t block_bytes, const std::vector<int>& model_ranks) {
  const int R = static_cast<int>(a_rows.shape(1));
  std::int64_t J = 1;
  for (auto n : dims) J *= n;
  require(chunk.ndim() == 2 && chunk.shape(1) == J, "chunk must be rows x J (flattened)");
  require(a_rows.ndim() == 2 && a_rows.shape(0) == chunk.shape(0),
          "a_rows must have one row per chunk sample");
  require(t_acc.ndim() == 2 && t_acc.shape(0) == R && t_acc.shape(1) == J, "t_acc must be R x J");
  require(py::isinstance<py::array_t<T>>(t_acc), "t_acc has the wrong dtype");
  require(
      py::isinstance<py::array_t<double>>(g) && g.ndim() == 2 && g.shape(0) == R && g.shape(1) == R,
      "g must be a float64 R x R array");
  require(py::isinstance<py::array_t<double>>(ata) && ata.shape(0) == R && ata.shape(1) == R,
          "ata must be a float64 R x R array");
  require(factors.size() == dims.size(), "one factor per resident mode");
  for (auto* a : {&chunk, &g, static_cast<const py::array*>(&a_rows),
                  static_cast<const py::array*>(&t_acc), static_cast<const py::array*>(&ata)})
    require_c_contiguous(*a, "every buffer");
  require(a_rows.writeable() && t_acc.writeable() && ata.writeable(), "outputs must be writable");

  peekcore::PassArgs<T> args;
  args.chunk = chunk.data();
  args.storage = storage;
  args.rows = chunk.shape(0);
  args.dims = dims;
  for (std::size_t m = 0; m < factors.size(); ++m) {
    const auto& f = factors[m];
    require(py::isinstance<py::array_t<T>>(f) && f.ndim() == 2 && f.shape(0) == dims[m] &&
                f.shape(1) == R,
            "factor " + std::to_string(m) + " must be I_m x R in the compute dtype");
    require_c_contiguous(f, "every factor");
    args.factors.push_back(static_cast<const T*>(f.data()));
  }
  args.g = static_cast<const double*>(g.data());
  args.a_rows = static_cast<T*>(a_rows.mutable_data());
  args.t_acc = static_cast<T*>(t_acc.mutable_data());
  args.ata = static_cast<double*>(ata.mutable_data());
  args.rank = R;
  args.update = update;
  args.sweeps = sweeps;
  args.want_norm = want_norm;
  args.block_bytes = block_bytes;
  column_blocks(model_ranks, R, args.comp_lo, args.comp_hi);
  py::gil_scoped_release release;
  return peekcore::pass_chunk<T>(args);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "peekcore native kernels (CPU pass; see peekcore.kernels)";
  m.def(
      "pass_chunk",
      [](const py::array& chunk, int storage, const std::vector<std::int64_t>& dims,
         const std::vector<py::array>& factors, const py::array& g, py::array a_rows,
         py::array t_acc, py::array ata, int update, int sweeps, bool want_norm,
         std::int64_t block_bytes, const std::vector<int>& model_ranks) -> double {
        if (py::isinstance<py::array_t<float>>(a_rows))
          return run_pass<float>(chunk, storage, dims, factors, g, a_rows, t_acc, ata, update,
                                 sweeps, want_norm, block_bytes, model_ranks);
        if (py::isinstance<py::array_t<double>>(a_rows))
          return run_pass<double>(chunk, storage, dims, factors, g, a_rows, t_acc, ata, update,
                                  sweeps, want_norm, block_bytes, model_ranks);
        throw py::type_error("a_rows must be float32 or float64 (the compute dtype)");
      },
      py::arg("chunk"), py::arg("storage"), py::arg("dims"), py::arg("factors"), py::arg("g"),
      py::arg("a_rows"), py::arg("t_acc"), py::arg("ata"), py::arg("update"), py::arg("sweeps"),
      py::arg("want_norm"), py::arg("block_bytes"), py::arg("model_ranks") = std::vector<int>());

  m.def(
      "hals_rows",
      [](py::array_t<double, py::array::c_style> f, py::array_t<double, py::array::c_style> m,
         py::array_t<double, py::array::c_style> g, int sweeps,
         const std::vector<int>& model_ranks) {
        require(f.ndim() == 2 && m.ndim() == 2 && g.ndim() == 2, "f, m, g must be matrices");
        const auto rows = f.shape(0);
        const int R = static_cast<int>(f.shape(1));
        require(m.shape(0) == rows && m.shape(1) == R, "m must have f's shape");
        require(g.shape(0) == R && g.shape(1) == R, "g must be R x R");
        require(f.writeable(), "f must be writable");
        std::vector<int> lo, hi;
        column_blocks(model_ranks, R, lo, hi);
        double* fp = f.mutable_data();
        const double* mp = m.data();
        const double* gp = g.data();
        py::gil_scoped_release release;
        peekcore::hals_rows(fp, mp, gp, rows, R, sweeps, hi);
      },
      py::arg("f"), py::arg("m"), py::arg("g"), py::arg("sweeps"),
      py::arg("model_ranks") = std::vector<int>(),
      "HALS sweeps on the rows of f (rows x R, float64, in place) from m and the Gram g.");

#ifdef PEEKCORE_WITH_CUDA
  // CUDA launchers (device pointers and the stream as integers); a launch error
  // raises RuntimeError with CUDA's message.
  auto check = [](int code, const char* what) {
    if (code != 0)
      throw std::runtime_error(std::string(what) + ": " + peekcore::cuda::error_string(code));
  };
  // Every launcher ends with the launch's shape: grid_x, grid_y, block,
  // shared bytes, stream (Python computes it, see launch.h).
  using peekcore::cuda::Shape;
  auto shape = [](unsigned gx, unsigned gy, unsigned block, std::size_t shared,
                  std::uintptr_t stream) { return Shape{gx, gy, block, shared, stream}; };
  m.def("cuda_sum_squares", [=](int storage, std::uintptr_t x, long long n, std::uintptr_t out,
                                unsigned gx, unsigned gy, unsigned block, std::size_t shared,
                                std::uintptr_t stream) {
    check(peekcore::cuda::sum_squares(storage, x, n, out, shape(gx, gy, block, shared, stream)),
          "sum_squares");
  });
  m.def("cuda_khatri_rao",
        [=](int storage, std::uintptr_t ptrs, std::uintptr_t dims, int d, int R, long long J,
            std::uintptr_t scale, int terms, std::uintptr_t out, unsigned gx, unsigned gy,
            unsigned block, std::size_t shared, std::uintptr_t stream) {
          check(peekcore::cuda::khatri_rao(storage, ptrs, dims, d, R, J, scale, terms, out,
                                           shape(gx, gy, block, shared, stream)),
                "khatri_rao");
        });
  m.def("cuda_update_rows",
        [=](int storage, std::uintptr_t mm, int m_cols, std::uintptr_t inv_scale, std::uintptr_t g,
            std::uintptr_t offsets, int R, long long rows, int hals, int sweeps, std::uintptr_t a,
            unsigned gx, unsigned gy, unsigned block, std::size_t shared, std::uintptr_t stream) {
          check(peekcore::cuda::update_rows(storage, mm, m_cols, inv_scale, g, offsets, R, rows,
                                            hals, sweeps, a, shape(gx, gy, block, shared, stream)),
                "update_rows");
        });
  m.def("cuda_split_rows",
        [=](int storage, std::uintptr_t a, std::uintptr_t scale, int R, long long rows, int terms,
            std::uintptr_t out, unsigned gx, unsigned gy, unsigned block, std::size_t shared,
            std::uintptr_t stream) {
          check(peekcore::cuda::split_rows(storage, a, scale, R, rows, terms, out,
                                           shape(gx, gy, block, shared, stream)),
                "split_rows");
        });
  m.def("cuda_add_split", [=](std::uintptr_t p, std::uintptr_t inv_scale, int R, long long J,
                              int terms, std::uintptr_t t, unsigned gx, unsigned gy, unsigned block,
                              std::size_t shared, std::uintptr_t stream) {
    check(peekcore::cuda::add_split(p, inv_scale, R, J, terms, t,
                                    shape(gx, gy, block, shared, stream)),
          "add_split");
  });
#endif

  m.def("build_info", []() {
    py::dict info;
    info["openmp"] = peekcore::has_openmp();
    info["openmp_version"] = peekcore::openmp_version();
    info["max_threads"] = peekcore::max_threads();
    info["blas"] = std::string(peekcore::blas_config());
    info["cpu_kernels"] = std::string(peekcore::cpu_kernels());
#ifdef PEEKCORE_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    // No iostreams here: with several C++ runtimes in one process (torch's, the
    // system's) a locale-dependent stream crashed on a GPU machine (2026-11-26).
#if defined(__clang__)
    info["compiler"] = "clang " + std::to_string(__clang_major__) + "." +
                       std::to_string(__clang_minor__) + "." + std::to_string(__clang_patchlevel__);
#elif defined(__GNUC__)
    info["compiler"] = "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) +
                       "." + std::to_string(__GNUC_PATCHLEVEL__);
#else
    info["compiler"] = "unknown";
#endif
    info["cxx_standard"] = static_cast<long>(__cplusplus);
    info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                       std::to_string(PYBIND11_VERSION_MINOR) + "." +
                       std::to_string(PYBIND11_VERSION_PATCH);
    return info;
  });
}
