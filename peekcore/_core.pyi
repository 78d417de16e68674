"""Type stub of the compiled extension peekcore._core (csrc/bindings.cpp)."""

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

# Present only in builds with PEEKCORE_CUDA=ON: device pointers and the stream as
# ints, `storage` a peekcore::Storage code, then the launch's shape.
def cuda_sum_squares(
    storage: int,
    x: int,
    n: int,
    out: int,
    grid_x: int,
    grid_y: int,
    block: int,
    shared: int,
    stream: int,
) -> None: ...
def cuda_khatri_rao(
    storage: int,
    ptrs: int,
    dims: int,
    d: int,
    R: int,
    J: int,
    scale: int,
    terms: int,
    out: int,
    grid_x: int,
    grid_y: int,
    block: int,
    shared: int,
    stream: int,
) -> None: ...
def cuda_update_rows(
    storage: int,
    m: int,
    m_cols: int,
    inv_scale: int,
    g: int,
    offsets: int,
    R: int,
    rows: int,
    hals: int,
    sweeps: int,
    a: int,
    grid_x: int,
    grid_y: int,
    block: int,
    shared: int,
    stream: int,
) -> None: ...
def cuda_split_rows(
    storage: int,
    a: int,
    scale: int,
    R: int,
    rows: int,
    terms: int,
    out: int,
    grid_x: int,
    grid_y: int,
    block: int,
    shared: int,
    stream: int,
) -> None: ...
def cuda_add_split(
    p: int,
    inv_scale: int,
    R: int,
    J: int,
    terms: int,
    t: int,
    grid_x: int,
    grid_y: int,
    block: int,
    shared: int,
    stream: int,
) -> None: ...
