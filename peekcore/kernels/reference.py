"""Plain torch implementation of the pass: the reference every kernel is checked against."""

from __future__ import annotations

import torch

from .base import ALS, PassKernel, PassOptions
from .ops import chunk_mttkrp, hals_rows

__all__ = ["TorchKernel", "chunk_mttkrp", "hals_rows"]


class TorchKernel(PassKernel):
    """The pass written in plain torch: one chunk at a time, no blocking."""

    name = "torch"

    def _pass(
        self, chunk, factors: list[torch.Tensor], g, a_rows, stats, options: PassOptions
    ) -> float | torch.Tensor:
        dtype = stats.t.dtype
        x = chunk.to(device=self.device, dtype=dtype)
        m = chunk_mttkrp(x, factors, options.dims).to(torch.float64)
        if options.update == ALS:
            a = m @ g
        else:
            a = hals_rows(a_rows.to(torch.float64).clone(), m, g, options.sweeps)
        a_rows.copy_(a)
        a_c = a_rows.to(torch.float64)
        stats.ata += a_c.T @ a_c
        stats.t.addmm_(a_rows.T, x)
        stats.rows += x.shape[0]
        if options.want_norm:
            return torch.sum(x.to(torch.float64) ** 2)
        return 0.0
