"""Data far from 1 in magnitude: fitted as an exactly rescaled copy, then scaled back.

CP is scale-equivariant: if ``X ~ [[A, B, C]]`` then ``s X ~ [[s A, B, C]]``,
and ALS and HALS take the same steps on both. The passes, though, square the
data (``||X||^2``, ``A^T A``) and multiply it by factors of about its own
size, so float32 data of magnitude 1e-25 underflows (``x^2 = 1e-50 -> 0``: an
all-zero model that "converges") and 1e20 overflows; float64 at 1e+-200 alike.

When the magnitude of a few sampled samples (``sources.sample_rows``) lies
outside ``2^+-SAFE_EXPONENT``, every chunk is read multiplied by a power of two
that brings its largest sampled value into ``[0.5, 1)``. Multiplying by a power
of two is exact in binary floating point (except for values that become
subnormal), and so is dividing the fitted model's weights by it afterwards: the
model is the one the unscaled data would give, up to rounding. Data in the safe
range is read as it is: nothing is copied and results do not change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..sources import ChunkSource, natural_chunk_size, sample_rows

__all__ = ["SAFE_EXPONENT", "ScaledSource", "choose_scale", "unscaled"]

# |log2 max|x|| up to which data is read as it is. float32: squares stay within
# 2^+-60, far from its range (2^+-126), also when summed over 1e9 values or
# multiplied by factors of the data's size; float64: likewise within 2^+-1022.
SAFE_EXPONENT = {torch.float32: 30, torch.float64: 250}


def _max_abs(block: Any) -> float:
    if isinstance(block, torch.Tensor):
        return (
            float(torch.max(torch.abs(block.detach().to(torch.float64)))) if block.numel() else 0.0
        )
    arr = np.asarray(block)
    return float(np.max(np.abs(arr.astype(np.float64)))) if arr.size else 0.0


def choose_scale(source: ChunkSource, compute_dtype: torch.dtype) -> float:
    """The power of two to multiply the data by (1.0 when its magnitude is safe).

    Judged from a few sampled samples; all zero or not finite there: 1.0 (the
    first pass then reports zeros or NaN/Inf with the samples that hold them).
    """
    blocks = sample_rows(source)
    top = max((_max_abs(b) for b in blocks), default=0.0)
    if top == 0.0 or not math.isfinite(top):
        return 1.0
    exponent = math.frexp(top)[1]  # top = f * 2^exponent, 0.5 <= f < 1
    if abs(exponent) <= SAFE_EXPONENT[compute_dtype]:
        return 1.0
    return math.ldexp(1.0, -exponent)


class ScaledSource:
    """A chunk source read multiplied by ``scale`` (a power of two: exact).

    Parameters
    ----------
    source : ChunkSource
    scale : float
    """

    def __init__(self, source: ChunkSource, scale: float) -> None:
        self.source, self.scale = source, float(scale)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def dtype(self) -> Any:
        return self.source.dtype

    @property
    def chunk_size(self) -> int | None:
        return natural_chunk_size(self.source)

    @property
    def device(self) -> str:
        return str(getattr(self.source, "device", "cpu"))

    @property
    def first_sample(self) -> int:
        return int(getattr(self.source, "first_sample", 0))

    def chunks(self, chunk_size: int) -> Iterator[Any]:
        for chunk in self.source.chunks(chunk_size):
            if isinstance(chunk, torch.Tensor):
                yield chunk * self.scale  # keeps the chunk's dtype
            else:
                arr = np.asarray(chunk)
                yield arr * arr.dtype.type(self.scale)

    def __repr__(self) -> str:
        return f"ScaledSource({self.source!r}, scale=2**{math.frexp(self.scale)[1] - 1})"


def unscaled(source: Any) -> Any:
    """The source under a :class:`ScaledSource` (a source read again by a nested fit)."""
    return source.source if isinstance(source, ScaledSource) else source
