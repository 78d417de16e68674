"""The pass's small operations in plain torch, shared by the contract and every kernel.

The reference kernel is built from them, the CUDA pass's torch backend and
the default resident HALS update call them; they import nothing else of
``peekcore`` so every kernel module can use them.
"""

from __future__ import annotations

import torch

__all__ = ["chunk_mttkrp", "hals_rows", "khatri_rao"]


def khatri_rao(factors: list[torch.Tensor]) -> torch.Tensor:
    """Khatri-Rao product ``I_1 * ... * I_k x R`` of ``I_m x R`` factors, the last fastest.

    Row ``(i_1, ..., i_k)`` in row-major order, so ``X.reshape(b, -1) @ khatri_rao(F)``
    contracts the modes of ``X`` (``b x I_1 x ... x I_k``) with the factors.
    """
    out = factors[0]
    for f in factors[1:]:
        out = (out[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    return out


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
