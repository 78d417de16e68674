"""Reading a source for one pass: shape-checked chunks, staged onto the GPU when needed."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import DataError, InvalidTypeError
from ..kernels import PassKernel
from ..kernels.base import PassStatistics
from ..sources import ChunkSource

__all__ = [
    "iterate_chunks",
    "pass_chunks",
    "accumulate_given_rows",
    "gram_pass",
    "check_nonnegative",
    "check_finite",
    "check_not_all_zeros",
    "check_overflow",
]


def _as_tensor(chunk: Any) -> torch.Tensor:
    if isinstance(chunk, torch.Tensor):
        return chunk.detach()
    arr = np.asarray(chunk)
    if not arr.dtype.isnative:  # torch reads native byte order only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if any(s < 0 for s in arr.strides):
        # flipped views (x[::-1]): torch refuses negative strides. A copy, not
        # np.ascontiguousarray, which keeps a one-sample chunk's negative stride as it is
        arr = arr.copy(order="C")
    with warnings.catch_warnings():
        # memory-mapped and read-only arrays: the kernels never write to chunks
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def first_sample(source: ChunkSource) -> int:
    """The whole data's index of the source's first sample: nonzero for a process's shard."""
    return int(getattr(source, "first_sample", 0))


def iterate_chunks(source: ChunkSource, chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Chunks of a source as tensors with their first sample index, shape-checked."""
    shape = tuple(source.shape)
    offset = 0
    for chunk in source.chunks(chunk_size):
        x = _as_tensor(chunk)
        if tuple(x.shape[1:]) != shape[1:] or x.ndim != len(shape):
            raise DataError(
                f"the chunk at samples {offset}..{offset + (x.shape[0] if x.ndim else 0)} has "
                f"shape {tuple(x.shape)}, but the source's shape {shape} says each chunk is "
                f"(b, {', '.join(map(str, shape[1:]))}); a chunk source must keep every "
                "non-sample dimension fixed"
            )
        if x.dtype.is_floating_point is False:
            raise InvalidTypeError(f"the chunk at sample {offset} has non-float dtype {x.dtype}")
        b = x.shape[0]
        if b == 0:
            continue
        if offset + b > shape[0]:
            raise DataError(
                f"the source yielded more than the {shape[0]} samples its shape declares"
            )
        yield offset, x
        offset += b
    if offset != shape[0]:
        raise DataError(
            f"the source yielded {offset} samples in a pass but its shape declares {shape[0]}"
        )


def on_device(source: ChunkSource, device: torch.device) -> bool:
    """Whether ``source`` says (by its optional ``device``) its chunks lie on ``device``.

    A CUDA device without an index means the current one, on either side.
    """
    where = torch.device(str(getattr(source, "device", "cpu")))
    if where.type != device.type:
        return False
    if where.type != "cuda":
        return True
    current = torch.cuda.current_device
    return (current() if where.index is None else where.index) == (
        current() if device.index is None else device.index
    )


def pass_chunks(
    source: ChunkSource, chunk_size: int, kern: PassKernel
) -> Iterator[tuple[int, torch.Tensor]]:
    """The chunks of one pass, staged onto the kernel's GPU when it has one."""
    chunks = iterate_chunks(source, chunk_size)
    if kern.device.type == "cuda" and not on_device(source, kern.device):  # else: views
        from ..staging import stage_to_device

        return stage_to_device(chunks, kern.device)
    return chunks


def accumulate_given_rows(
    x: torch.Tensor, a_rows: torch.Tensor, stats: PassStatistics, want_norm: bool
) -> float:
    """The statistics of one chunk against sample-factor rows that stay as they are.

    The pass of a fit whose sample mode is fixed (``fixed_modes`` holding 0),
    and of the residual of a given model: ``T += A_b^T X_b``, ``AtA += A_b^T A_b``.

    Parameters
    ----------
    x : torch.Tensor
        ``b x J`` chunk, stored dtype.
    a_rows : torch.Tensor
        ``b x R`` rows of the sample factor (compute dtype), not changed.
    stats : PassStatistics
        ``t`` (``R x J``, compute dtype) and ``ata`` (float64), updated in place.
    want_norm : bool
        Return the chunk's sum of squares (float64), else 0.
    """
    xc = x.to(stats.t.dtype)
    stats.t += a_rows.T @ xc
    a64 = a_rows.to(torch.float64)
    stats.ata += a64.T @ a64
    return float(torch.sum(x.to(torch.float64) ** 2)) if want_norm else 0.0


def check_nonnegative(x: torch.Tensor, offset: int) -> None:
    """Refuse negative data for a nonnegative fit, naming the first offending samples."""
    mins = torch.amin(x.reshape(x.shape[0], -1), dim=1)
    bad = torch.nonzero(mins < 0)
    if bad.numel():
        first = offset + int(bad[0, 0])
        last = offset + int(bad[-1, 0])
        raise DataError(
            f"ncp_hals needs nonnegative data, but samples {first}..{last} of the chunk at "
            f"{offset}..{offset + x.shape[0] - 1} hold negative values (smallest "
            f"{float(mins.min()):.4g}); use cp_als for signed data, or factor nonnegative "
            "activations (e.g. after a ReLU)"
        )


def check_finite(
    norm2: float, offset: int, chunk: torch.Tensor, compute_dtype: torch.dtype
) -> None:
    """Refuse a chunk whose sum of squares is NaN or Inf, naming the sample that holds them.

    Finite data whose squares overflowed the compute dtype is told apart
    (:func:`check_overflow`): it is not "NaN or Inf".

    Parameters
    ----------
    norm2 : float
        The chunk's ``||X_b||^2`` as the pass computed it.
    offset : int
        The whole data's index of the chunk's first sample.
    chunk : torch.Tensor
        ``b x ...`` the chunk as read.
    compute_dtype : torch.dtype
    """
    if math.isfinite(norm2):
        return
    finite = torch.isfinite(chunk.reshape(chunk.shape[0], -1)).all(dim=1).cpu()
    bad = torch.nonzero(~finite).flatten().tolist()
    if not bad:
        check_overflow(offset, chunk.shape[0], compute_dtype)
    first = offset + bad[0]
    others = f" (and {len(bad) - 1} more samples up to {offset + bad[-1]})" if len(bad) > 1 else ""
    raise DataError(
        f"the data holds NaN or Inf at sample {first}{others}: clean or drop those samples "
        "(e.g. np.nan_to_num) before fitting"
    )


def check_not_all_zeros(norm2: float) -> None:
    """Refuse data whose ``||X||^2`` (of all of it, every process summed) is zero."""
    if norm2 == 0.0:
        raise DataError("the data is all zeros: there is nothing to factor")


def check_overflow(offset: int, rows: int, compute_dtype: torch.dtype) -> None:
    """Refuse finite data whose Gram overflowed the compute dtype (not NaN/Inf in the data)."""
    name = str(compute_dtype).removeprefix("torch.")
    fix = (
        "fit with dtype='float64'"
        if compute_dtype != torch.float64
        else "rescale the data (e.g. divide by its largest magnitude)"
    )
    raise DataError(
        f"the sum of squares of samples {offset}..{offset + rows - 1} overflowed {name}: the "
        f"data is finite, but too large to accumulate in {name} (peekcore rescales data by the "
        f"magnitude of a few sampled samples, and these are far larger); {fix}"
    )


def gram_pass(
    source: ChunkSource,
    chunk_size: int,
    compute_dtype: torch.dtype,
    device: torch.device,
    nonneg: bool = False,
) -> tuple[list[torch.Tensor], float]:
    """One streamed pass: every resident mode's Gram ``X_(m) X_(m)^T``, and ``||X||^2``."""
    shape = tuple(source.shape)
    d = len(shape) - 1
    grams = [torch.zeros((n, n), dtype=torch.float64, device=device) for n in shape[1:]]
    norm2 = 0.0
    base = first_sample(source)  # errors name samples of the whole data
    for offset, chunk in iterate_chunks(source, chunk_size):
        offset += base
        x = chunk.to(device=device, dtype=compute_dtype)
        if nonneg:
            check_nonnegative(x, offset)
        chunk_grams = [_mode_gram(x, m + 1) for m in range(d)]
        sq = float(torch.trace(chunk_grams[0]))  # ||X_b||^2: any mode's Gram trace
        check_finite(sq, offset, chunk, compute_dtype)
        norm2 += sq
        for g, cg in zip(grams, chunk_grams, strict=True):
            g += cg
    return grams, norm2


def _mode_gram(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``X_(axis) X_(axis)^T`` in float64 (``I_axis x I_axis``).

    On the CPU through numpy, whose ``a @ a.T`` runs BLAS's symmetric rank-k
    update (half the flops of a GEMM; 3.4x faster than torch.tensordot for a
    256-channel mode, measured).
    """
    if x.device.type == "cpu":
        arr = x.numpy()
        mat = np.ascontiguousarray(np.moveaxis(arr, axis, 0)).reshape(arr.shape[axis], -1)
        with np.errstate(over="ignore"):  # gram_pass tells overflow from NaN/Inf data
            gram = mat @ mat.T
        return torch.from_numpy(gram.astype(np.float64))
    others = [k for k in range(x.ndim) if k != axis]
    return torch.tensordot(x, x, dims=(others, others)).to(torch.float64)
