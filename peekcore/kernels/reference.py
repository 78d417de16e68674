"""Plain torch implementation of the pass: the reference every kernel is checked against."""

from __future__ import annotations

import torch

from .base import ALS, PassKernel, PassStatistics

__all__ = ["TorchKernel", "chunk_mttkrp", "hals_rows"]


def chunk_mttkrp(
    x: torch.Tensor, factors: list[torch.Tensor], dims: tuple[int, ...]
) -> torch.Tensor:
    """MTTKRP of a chunk with the resident factors, no Khatri-Rao product formed.

    Parameters
    ----------
    x : torch.Tensor
        ``b x J`` in the compute dtype.
    factors : list of torch.Tensor
        ``I_m x R`` each, ``prod(I_m) == J``.
    dims : tuple of int
        ``(I_1, ..., I_d)``.

    Returns
    -------
    torch.Tensor
        ``b x R``.
    """
    b = x.shape[0]
    rank = factors[0].shape[1]
    # contract the last resident mode with one matrix product, then the others
    w = (x.reshape(-1, dims[-1]) @ factors[-1]).reshape(b, -1, rank)
    for mode in range(len(dims) - 2, -1, -1):
        w = w.reshape(b, -1, dims[mode], rank)
        w = (w * factors[mode]).sum(dim=2)
    return w.reshape(b, rank)


def hals_rows(a: torch.Tensor, m: torch.Tensor, g: torch.Tensor, sweeps: int) -> torch.Tensor:
    """HALS sweeps over the columns of a nonnegative factor (in place).

    ``a`` (``n x R``), ``m`` the MTTKRP (``n x R``), ``g`` the Gram (``R x R``).
    Each column update: ``a_r <- max(0, a_r + (m_r - a g_r) / g_rr)``; a column
    with ``g_rr == 0`` is left as is.
    """
    rank = a.shape[1]
    # which columns move is decided on the device (torch.where), not by the host:
    # no synchronization, so a GPU iteration can be captured as a CUDA graph
    diag = torch.diagonal(g)
    live = diag > 0
    safe = torch.where(live, diag, torch.ones_like(diag))
    for _ in range(sweeps):
        for r in range(rank):
            resid = m[:, r] - a @ g[:, r]
            moved = torch.clamp(a[:, r] + resid / safe[r], min=0)
            a[:, r] = torch.where(live[r], moved, a[:, r])
    return a


class TorchKernel(PassKernel):
    """The pass written in plain torch: one chunk at a time, no blocking."""

    name = "torch"

    def pass_chunk(
        self,
        chunk: torch.Tensor,
        factors: list[torch.Tensor],
        g: torch.Tensor,
        a_rows: torch.Tensor,
        stats: PassStatistics,
        *,
        dims: tuple[int, ...],
        update: str,
        sweeps: int,
        want_norm: bool,
        blocks: tuple[int, ...] | None = None,
    ) -> float | torch.Tensor:
        dtype = stats.t.dtype
        x = chunk.to(device=self.device, dtype=dtype)
        m = chunk_mttkrp(x, factors, dims).to(torch.float64)
        if update == ALS:
            a = m @ g
        else:
            a = hals_rows(a_rows.to(torch.float64).clone(), m, g, sweeps)
        a_rows.copy_(a)
        a_c = a_rows.to(torch.float64)
        stats.ata += a_c.T @ a_c
        stats.t.addmm_(a_rows.T, x)
        stats.rows += x.shape[0]
        if want_norm:
            return torch.sum(x.to(torch.float64) ** 2)
        return 0.0
