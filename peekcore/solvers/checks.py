"""Argument checks shared by the solvers: every message says what to change."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..sources import dtype_name

__all__ = [
    "TORCH_DTYPES",
    "check_rank",
    "check_shape",
    "check_iterations",
    "compute_dtype_for",
    "chunk_size_for",
]

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
DEFAULT_MAX_CHUNK_BYTES = 64 << 20  # CPU: a chunk is a unit of reading, blocks do the work
DEVICE_RESIDENT_CHUNK_BYTES = 1 << 30  # data already on the GPU: few, large GEMMs
DEVICE_STREAMED_CHUNK_BYTES = 256 << 20  # host -> GPU: double-buffered copies of this size
# CPU, default budget: a source's own chunk (a store's stored chunk) of at least this size
# is read alone, not grouped up to the budget. A store hands those out as mappings of its
# files, without a copy; a 4,096 x 256 x 14 x 14 float16 fit from a store went 129-149 ->
# 96-99 ms per iteration (benchmarks/bench_store_fit.py), and passes over 128 samples
# instead of 668 cost the same fit in memory at most 10 ms.
NATURAL_CHUNK_ALONE_BYTES = 4 << 20


def check_rank(rank: Any, shape: tuple[int, ...]) -> int:
    """A positive integer rank that the data can support."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if rank > shape[0]:
        raise ValueError(
            f"rank {rank} exceeds the number of samples ({shape[0]}): the sample factor would "
            "be underdetermined; choose rank <= the number of samples"
        )
    return rank


def check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The data's shape, refused when it has no sample mode and two other modes."""
    if len(shape) < 3:
        raise ValueError(
            f"peekcore factors tensors with a sample mode and at least two other modes "
            f"(order >= 3); got shape {shape} (order {len(shape)}). A matrix has no unique "
            "CP decomposition (that is PCA / NMF): keep channels and space (or tokens) as "
            "separate modes, e.g. N x C x (H*W)."
        )
    if shape[0] == 0:
        raise ValueError(f"the sample mode is empty (shape {shape}): there is nothing to fit")
    if any(n == 0 for n in shape[1:]):
        raise ValueError(f"shape {shape} has an empty mode: there is nothing to fit")
    return shape


def check_iterations(n_iter_max: Any, tol: Any, sweeps: Any) -> tuple[int, float, int]:
    """Validated ``n_iter_max``, ``tol`` and HALS ``sweeps``."""
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, numbers.Integral):
        raise TypeError(f"n_iter_max must be an integer, got {n_iter_max!r}")
    if n_iter_max < 1:
        raise ValueError(f"n_iter_max must be at least 1, got {n_iter_max}")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ValueError(f"tol must be a nonnegative number, got {tol!r}")
    if isinstance(sweeps, bool) or not isinstance(sweeps, numbers.Integral) or sweeps < 1:
        raise ValueError(f"sweeps must be a positive integer, got {sweeps!r}")
    return int(n_iter_max), float(tol), int(sweeps)


def compute_dtype_for(stored: str, dtype: Any) -> torch.dtype:
    """Accumulation dtype: float64 for float64 data, else float32, unless asked."""
    if dtype is None:
        return torch.float64 if stored == "float64" else torch.float32
    compute = TORCH_DTYPES[dtype_name(dtype)]
    if compute not in (torch.float32, torch.float64):
        raise ValueError(
            f"dtype sets the accumulation precision and must be float32 or float64, got "
            f"{dtype}; half-precision storage is fine, accumulation in half is not"
        )
    return compute


def chunk_size_for(
    shape: tuple[int, ...],
    stored: str,
    chunk_size: int | None,
    max_chunk_bytes: int | None,
    default_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    natural: int | None = None,
    natural_alone_bytes: int | None = None,
) -> int:
    """Samples per chunk: ``chunk_size`` if given, else as many as fit in the byte budget.

    ``natural``: the source's own chunk in samples (a store's stored chunks);
    without a ``chunk_size`` the chunk is then the largest multiple of it in
    the budget (at least one), so that reads stay whole stored chunks.
    ``natural_alone_bytes``: with the default budget, a natural chunk of at
    least this many bytes is used alone instead (whole stored chunks come
    without a copy).
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        return int(chunk_size)
    per_sample = math.prod(shape[1:]) * torch.empty((), dtype=TORCH_DTYPES[stored]).element_size()
    budget = default_bytes if max_chunk_bytes is None else int(max_chunk_bytes)
    if natural is not None and natural >= 1:
        alone = natural_alone_bytes is not None and max_chunk_bytes is None
        if alone and natural_alone_bytes <= natural * per_sample <= budget:
            return min(shape[0], natural)
        return max(1, min(shape[0], max(1, budget // (natural * per_sample)) * natural))
    return max(1, min(shape[0], budget // per_sample))
