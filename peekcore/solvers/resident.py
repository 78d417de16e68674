"""Updates of the resident (non-sample) factors from a pass's statistics.

Everything here is small: ``T`` is ``R x I_1 x ... x I_d`` and the solves are
``R x R``. It runs in float64 torch on the kernel's device, so a GPU fit needs
no host round trip until the fit scalar.
"""

from __future__ import annotations

import string

import torch

__all__ = ["gram_inverse", "resident_mttkrp", "als_solve", "hadamard"]


def hadamard(mats: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise product of equally shaped matrices."""
    out = mats[0].clone()
    for m in mats[1:]:
        out *= m
    return out


def _device_cholesky(g: torch.Tensor) -> torch.Tensor:
    # On a GPU, checking Cholesky's status would stop the host each solve. A
    # ridge of 1e-12 of the mean diagonal keeps the Gram numerically positive
    # definite instead (a relative change far below float32 rounding).
    ridge = 1e-12 * torch.clamp(torch.diagonal(g).mean(), min=1e-300)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return torch.linalg.cholesky_ex(g + ridge * eye)[0]


def gram_inverse(g: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric PSD Gram (Cholesky; pseudo-inverse when singular on the CPU)."""
    if g.is_cuda:
        return torch.cholesky_inverse(_device_cholesky(g))
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    return torch.linalg.pinv(g, hermitian=True)


def als_solve(m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Least-squares factor update ``F = M G^-1`` (``M``: ``I x R``, ``G``: ``R x R``)."""
    if g.is_cuda:
        return torch.cholesky_solve(m.T, _device_cholesky(g)).T
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(m.T, chol).T
    return m @ torch.linalg.pinv(g, hermitian=True)


def resident_mttkrp(t: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """MTTKRP of the full tensor for resident ``mode``, from ``T = X x_0 A^T``.

    Parameters
    ----------
    t : torch.Tensor
        ``R x I_1 x ... x I_d``.
    factors : list of torch.Tensor
        The resident factors ``I_k x R`` (entry ``mode`` is not used).
    mode : int
        Index into ``factors`` (0 is the first resident mode).

    Returns
    -------
    torch.Tensor
        ``I_mode x R``: ``sum_{k != mode} T[r, ..., i_k, ...] F_k[i_k, r]``.
    """
    d = t.ndim - 1
    letters = string.ascii_lowercase[:d]
    operands = [t]
    subs = ["z" + letters]
    # contract the largest modes first: torch's einsum goes left to right
    others = sorted((k for k in range(d) if k != mode), key=lambda k: -t.shape[k + 1])
    for k in others:
        operands.append(factors[k])
        subs.append(letters[k] + "z")
    expr = ",".join(subs) + "->" + letters[mode] + "z"
    return torch.einsum(expr, *operands)
