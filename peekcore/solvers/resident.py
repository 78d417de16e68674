"""Updates of the resident (non-sample) factors from a pass's statistics.

Everything here is small: ``T`` is ``R x I_1 x ... x I_d`` and the solves are
``R x R``. It runs in float64 torch on the kernel's device, so a GPU fit needs
no host round trip until the fit scalar.
"""

from __future__ import annotations

import string

import torch

from ..kernels.base import khatri_rao

__all__ = [
    "ResidentMTTKRP",
    "gram_inverse",
    "resident_mttkrp",
    "als_solve",
    "hadamard",
    "with_noise_floor",
]

# ALS Grams that the statistics cannot resolve get their diagonal raised by this many
# units of the statistics' rounding (with_noise_floor), fully once the rounding times the
# Gram's condition reaches NOISE_FLOOR_FULL
NOISE_FLOOR_ULPS = 10.0
NOISE_FLOOR_FULL = 1e-3


def hadamard(mats: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise product of equally shaped matrices."""
    out = mats[0].clone()
    for m in mats[1:]:
        out *= m
    return out


def with_noise_floor(
    g: torch.Tensor, stats_dtype: torch.dtype, seg: torch.Tensor | None = None, n_blocks: int = 1
) -> torch.Tensor:
    """An ALS Gram with its diagonal raised where the statistics cannot resolve the solve.

    A fit whose pass accumulates in float32 has Grams and MTTKRPs with relative
    errors of float32's ``eps``; a solve against ``G`` multiplies them by about
    ``cond(G)``. When the rank exceeds what the data holds, ``G`` becomes
    nearly singular: the components then grew into huge pairs that cancel
    (weights of 1e8 on a rank-2 tensor fitted at rank 8), the residual
    ``||X||^2 - 2<X, M> + ||M||^2`` was lost to cancellation, and the fit was
    reported as 1.0 while the real one was 0.79.

    Each block (stacked model) gets ``G_ii += c eps w G_ii`` with
    ``c = NOISE_FLOOR_ULPS`` and ``w = min(1, eps cond / NOISE_FLOOR_FULL)``:
    ``cond`` is estimated by the smallest Cholesky pivot of the block scaled to
    a unit diagonal (it bounds the smallest eigenvalue from above, so a small
    pivot means a nearly singular block). A well-conditioned block is changed
    far below its own rounding (a plain ``c eps`` ridge moved float32 fits
    against float64 references by 2e-4); one that the statistics cannot
    resolve is raised fully, which stops the growth. Scaled by each column, it
    is the same for any split of the scale between modes, and it keeps stacked
    models apart. With float64 statistics ``w`` is nil for any realistic
    condition. Nothing here waits for a GPU.

    Parameters
    ----------
    g : torch.Tensor
        ``R x R`` symmetric positive semidefinite (float64), block diagonal
        when models are stacked.
    stats_dtype : torch.dtype
        The dtype the pass accumulated in.
    seg, n_blocks :
        The block of each column and the number of blocks (``None``: one).
    """
    eps = torch.finfo(stats_dtype).eps
    diag = torch.diagonal(g)
    scale = torch.rsqrt(torch.clamp(diag, min=torch.finfo(g.dtype).tiny))
    unit = g * scale[:, None] * scale[None, :]  # unit diagonal where the column is not zero
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    pivots = torch.diagonal(torch.linalg.cholesky_ex(unit + 1e-12 * eye)[0]) ** 2
    smallest = torch.clamp(_per_block(pivots, seg, n_blocks, "amin"), max=1.0)
    weight = torch.clamp(eps / smallest / NOISE_FLOOR_FULL, max=1.0)
    return g + torch.diag(diag * (NOISE_FLOOR_ULPS * eps) * weight)


def _per_block(values: torch.Tensor, seg: torch.Tensor | None, n_blocks: int, reduce: str):
    """``reduce`` (``"amin"``, ``"mean"``) of ``values`` over each block, at each column.

    ``seg``: the block of each column (``None``: all one block). No host sync.
    """
    if seg is None:
        seg = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
    per = torch.zeros(n_blocks, dtype=values.dtype, device=values.device)
    return per.scatter_reduce(0, seg, values, reduce=reduce, include_self=False)[seg]


def _device_cholesky(g: torch.Tensor, seg: torch.Tensor | None, n_blocks: int) -> torch.Tensor:
    # On a GPU, checking Cholesky's status would stop the host each solve. A
    # ridge of 1e-12 of each block's mean diagonal keeps the Gram numerically
    # positive definite instead (a relative change far below float32 rounding),
    # a dead column included. Per block: stacked models differ in scale by up
    # to 1e17, and one mean would wipe out the small ones.
    mean = _per_block(torch.diagonal(g), seg, n_blocks, "mean")
    ridge = 1e-12 * torch.clamp(mean, min=1e-300)
    return torch.linalg.cholesky_ex(g + torch.diag(ridge))[0]


def _inverse_by_blocks(g: torch.Tensor, seg: torch.Tensor | None) -> torch.Tensor:
    """Inverse of a block-diagonal PSD Gram, block by block (pseudo-inverse where singular).

    One pseudo-inverse of the whole stack would cut eigenvalues relative to the
    largest of any model, and so zero out a model of small scale next to a
    large one.
    """
    sizes = [g.shape[0]] if seg is None else torch.unique_consecutive(seg, return_counts=True)[1]
    out = torch.zeros_like(g)
    lo = 0
    for n in [int(n) for n in sizes]:
        block = g[lo : lo + n, lo : lo + n]
        chol, info = torch.linalg.cholesky_ex(block)
        inv = torch.cholesky_inverse(chol) if int(info) == 0 else None
        out[lo : lo + n, lo : lo + n] = (
            inv if inv is not None else torch.linalg.pinv(block, hermitian=True)
        )
        lo += n
    return out


def gram_inverse(
    g: torch.Tensor, seg: torch.Tensor | None = None, n_blocks: int = 1
) -> torch.Tensor:
    """Inverse of a symmetric PSD Gram (Cholesky; pseudo-inverse when singular on the CPU).

    ``seg``: the block (stacked model) of each column, with ``n_blocks`` blocks,
    when ``g`` is block diagonal; each block is then treated on its own scale.
    """
    if g.is_cuda:
        return torch.cholesky_inverse(_device_cholesky(g, seg, n_blocks))
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    return _inverse_by_blocks(g, seg)


def als_solve(
    m: torch.Tensor, g: torch.Tensor, seg: torch.Tensor | None = None, n_blocks: int = 1
) -> torch.Tensor:
    """Least-squares factor update ``F = M G^-1`` (``M``: ``I x R``, ``G``: ``R x R``).

    ``seg``, ``n_blocks``: as in :func:`gram_inverse`.
    """
    if g.is_cuda:
        return torch.cholesky_solve(m.T, _device_cholesky(g, seg, n_blocks)).T
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(m.T, chol).T
    return m @ _inverse_by_blocks(g, seg)


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


class ResidentMTTKRP:
    """The resident MTTKRPs of one iteration, in the order ALS updates the modes.

    Modes ``0 .. d-2`` share ``Y = T x_d F_d`` (``R x I_1 x ... x I_{d-1}``),
    formed at the first call: ``F_d`` changes only after them. The last mode
    contracts ``T`` with the Khatri-Rao product of the (updated) others. So
    ``T`` is read twice per iteration, each time as one batched matrix product
    over its natural ``R x (I_1 ... I_{d-1}) x I_d`` layout, with no permuted
    copy of it; per-mode ``einsum`` read it once per mode through permuted
    copies (the three MTTKRPs of a 64 x 112 x 112 layer at R = 16: 150 -> 21 ms).

    Parameters
    ----------
    t : torch.Tensor
        ``R x I_1 x ... x I_d`` float64, contiguous.
    """

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.t3 = t.reshape(t.shape[0], -1, t.shape[-1])  # R x P x K, a view
        self.y: torch.Tensor | None = None

    def __call__(self, mode: int, factors: list[torch.Tensor]) -> torch.Tensor:
        """MTTKRP of resident ``mode`` (``I_mode x R``) with the ``factors`` as they are now.

        Call with ``mode = 0, 1, ..., d-1`` in turn, updating ``factors[mode]``
        in between (the last factor must not change before the last mode).
        """
        d = len(factors)
        if mode < d - 1:
            if self.y is None:  # R x P: for each r, T[r] (P x K) @ F_d[:, r]
                y = torch.bmm(self.t3, factors[-1].T.unsqueeze(2)).squeeze(2)
                self.y = y.reshape(self.t.shape[:-1])
            return resident_mttkrp(self.y, factors[:-1], mode)
        w = khatri_rao(list(factors[:-1]))  # P x R
        return torch.bmm(w.T.unsqueeze(1), self.t3).squeeze(1).T  # K x R
