"""Type stub of the compiled extension peekcore._core (csrc/bindings.cpp)."""

from typing import Protocol

import numpy as np

def pass_chunk(
    chunk: np.ndarray,
    storage: int,
    dims: list[int],
    factors: list[np.ndarray],
    g: np.ndarray,
    a_rows: np.ndarray,
    t_acc: np.ndarray,
    ata: np.ndarray,
    update: int,
    sweeps: int,
    want_norm: bool,
    block_bytes: int,
    model_ranks: list[int] = ...,
) -> float:
    """One chunk of the pass (see peekcore.kernels.base): rows of A, T and A^T A updated."""

def hals_rows(
    f: np.ndarray, m: np.ndarray, g: np.ndarray, sweeps: int, model_ranks: list[int] = ...
) -> None:
    """HALS sweeps on the rows of f (rows x R, float64, in place)."""

def build_info() -> dict[str, object]:
    """What was compiled in: OpenMP, BLAS, CUDA, compiler, C++ standard, pybind11."""

class _CudaLaunch(Protocol):
    """The launcher of one kernel of csrc/cuda/cp_pass.cu, ``cuda_<kernel>``.

    Present only in builds with PEEKCORE_CUDA=ON. Every argument is an int,
    passed by position: the peekcore::Storage code of the template type (templates
    only), then the kernel's arguments in the order of the host launcher of the
    same name in csrc/cuda/launch.h (device pointers as addresses), then the
    launch's shape: grid_x, grid_y, block, shared bytes, and the cudaStream_t.
    The lambdas in csrc/bindings.cpp are the exact lists (tests/test_kernels.py
    checks each launch against them). A failed launch raises RuntimeError.
    """

    def __call__(self, *args: int) -> None: ...

cuda_sum_squares: _CudaLaunch
cuda_khatri_rao: _CudaLaunch
cuda_update_rows: _CudaLaunch
cuda_split_rows: _CudaLaunch
cuda_add_split: _CudaLaunch
