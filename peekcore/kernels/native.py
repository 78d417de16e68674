"""The C++ extension's pass (``peekcore._core.pass_chunk``): the CPU default."""

from __future__ import annotations

import numpy as np
import torch

from .._native import core
from ..errors import InvalidArgumentError
from .base import ALS, PassKernel, PassOptions
from .ops import khatri_rao
from .storage import storage_code

__all__ = ["NativeKernel"]

#: decoded bytes of one thread's share of a block of samples (its columns of the
#: block); sized so the share stays in cache between the two contractions
DEFAULT_BLOCK_BYTES = 4 << 20


#: fewest rows P = I_1 * ... * I_{t-1} the leading modes may keep (and at least
#: 4 per thread): the threads share a block by ranges of these rows
MIN_LEADING_ROWS = 64


def trailing_start(dims: list[int], threads: int = 1) -> int:
    """Where the trailing group of resident modes starts (index into ``dims``).

    The pass contracts the trailing group first, as one matrix product over
    ``K = I_t * ... * I_d`` per row of the leading modes. A small K starves
    that product: an ``N x C x H x W`` layer contracted over W = 14 alone ran
    3.5x slower than the same data folded to ``N x C x (H*W)``. So the trailing
    group is as large as possible while the leading modes keep at least
    ``max(MIN_LEADING_ROWS, 4 * threads)`` rows for the ``threads`` of the
    pass to share; 3-way data is unchanged.
    """
    need = max(MIN_LEADING_ROWS, 4 * threads)
    lead = 1
    for t in range(1, len(dims)):
        lead *= dims[t - 1]
        if lead >= need:
            return t
    return len(dims) - 1


def _numpy_view(x: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor (bfloat16 as its int16 bits)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy()
    return x.numpy()


class NativeKernel(PassKernel):
    """Blocked CPU pass (C++, OpenMP): AVX-512 kernels for both contractions, else OpenBLAS."""

    name = "native"

    def __init__(self, device: str | torch.device = "cpu", block_bytes: int = DEFAULT_BLOCK_BYTES):
        super().__init__(device)
        if self.device.type != "cpu":
            raise InvalidArgumentError(
                "the native kernel runs on the CPU; use kernel='cuda' on a GPU"
            )
        self._core = core()
        self.block_bytes = int(block_bytes)
        self.threads = int(self._core.build_info()["max_threads"])  # the pass's OpenMP team

    def prepare_factors(self, factors: list[torch.Tensor], dtype: torch.dtype) -> list:
        """The factors the C++ pass contracts, trailing modes merged (see ``trailing_start``).

        Merged modes travel as their Khatri-Rao product (formed in float64, one
        rounding to ``dtype``); ``pass_chunk`` reads the grouped sizes from them.
        """
        t = trailing_start([f.shape[0] for f in factors], self.threads)
        merged = khatri_rao([f.to(torch.float64) for f in factors[t:]])
        return [f.to(dtype=dtype).contiguous().numpy() for f in (*factors[:t], merged)]

    def hals_update(self, f, m, g, sweeps, blocks=None) -> torch.Tensor:
        # the resident HALS sweeps in C++ (same order and rounding as the reference)
        out = f.detach().to(torch.float64).contiguous().clone()
        self._core.hals_rows(
            out.numpy(),
            m.to(torch.float64).contiguous().numpy(),
            g.to(torch.float64).contiguous().numpy(),
            int(sweeps),
            list(blocks or ()),
        )
        return out

    def _pass(
        self, chunk, factors: list[np.ndarray], g, a_rows, stats, options: PassOptions
    ) -> float:
        x = chunk.contiguous()
        if x.device.type != "cpu":
            x = x.cpu()
        out = a_rows if a_rows.is_contiguous() else a_rows.contiguous()
        norm2 = self._core.pass_chunk(
            _numpy_view(x.reshape(x.shape[0], -1)),
            storage_code(x.dtype),
            [f.shape[0] for f in factors],  # the modes as prepare_factors grouped them
            factors,
            g.contiguous().numpy(),
            out.numpy(),
            stats.t.numpy(),
            stats.ata.numpy(),
            0 if options.update == ALS else 1,
            int(options.sweeps),
            bool(options.want_norm),
            self.block_bytes,
            list(options.blocks or ()),
        )
        if out is not a_rows:
            a_rows.copy_(out)
        stats.rows += x.shape[0]
        return norm2
