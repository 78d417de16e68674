"""One iteration of the models being fitted: a pass over the data, then the resident updates.

The active models sit side by side in a :class:`Stack` (model ``k`` owns
columns ``[lo_k, hi_k)`` of every factor). Every Gram-like matrix is then
block diagonal (``Stack.mask``), so one solve, one MTTKRP and one HALS call
serve all models, and the data is read once per iteration for all of them.

:func:`step` changes the stack's tensors in place and allocates nothing that
outlives it, so that on a GPU the same call can be captured once as a CUDA
graph and replayed (``peekcore.solvers.graphs``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..errors import NumericalError
from ..kernels import ALS
from ..kernels.base import PassStatistics
from .passes import (
    accumulate_given_rows,
    check_finite,
    check_nonnegative,
    check_not_all_zeros,
    first_sample,
    pass_chunks,
)
from .resident import ResidentMTTKRP, als_solve, gram_inverse, hadamard, with_noise_floor

__all__ = ["Stack", "StepResult", "step", "residual"]


@dataclass
class Stack:
    """The active models side by side.

    Attributes
    ----------
    states : list of ModelState
        In column order; their ``a`` and ``resident`` are views of the stack.
    ranks : tuple of int
    resident : list of torch.Tensor
        ``I_m x R_total`` float64, updated in place by :func:`step`.
    a : torch.Tensor
        ``N x R_total`` sample factor in the compute dtype (rows written in place).
    seg : torch.Tensor
        ``R_total`` int64: the model of each column.
    mask : torch.Tensor
        ``R_total x R_total`` float64: 1 inside a model's diagonal block, else 0.
    """

    states: list
    ranks: tuple[int, ...]
    resident: list[torch.Tensor]
    a: torch.Tensor
    seg: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, states: list) -> Stack:
        """Stack the factors of ``states`` (copies) and point the states at their columns."""
        ranks = tuple(s.rank for s in states)
        n_modes = len(states[0].resident)
        resident = [torch.cat([s.resident[m] for s in states], dim=1) for m in range(n_modes)]
        if len(states) == 1:
            a = states[0].a = states[0].a.contiguous()  # kernels write rows in place
        else:
            a = torch.cat([s.a for s in states], 1)
        dev = resident[0].device
        seg = torch.repeat_interleave(
            torch.arange(len(states), device=dev), torch.tensor(ranks, device=dev)
        )
        mask = (seg[:, None] == seg[None, :]).to(torch.float64)
        stack = cls(list(states), ranks, resident, a, seg, mask)
        lo = 0
        for s in states:
            hi = lo + s.rank
            s.a = a[:, lo:hi] if len(states) > 1 else a
            s.resident = [f[:, lo:hi] for f in resident]
            lo = hi
        return stack

    def holds(self, states: list) -> bool:
        """Whether this stack is exactly ``states``, in order."""
        return len(states) == len(self.states) and all(
            s is t for s, t in zip(states, self.states, strict=True)
        )

    def columns(self) -> list[tuple[int, int]]:
        """``(lo, hi)`` of each model's columns."""
        bounds = [0, *itertools.accumulate(self.ranks)]
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the tensors :func:`step` changes (``a``, then ``resident``)."""
        return [self.a.clone(), *(f.clone() for f in self.resident)]

    @staticmethod
    def release(state) -> None:
        """Give a model that leaves the stack its own copies of its columns.

        Otherwise its views would keep the whole stack alive (``N x R_total``)
        after the others moved on to a new one.
        """
        state.a = state.a.contiguous()
        state.resident = [f.contiguous() for f in state.resident]

    def restore(self, saved: list[torch.Tensor]) -> None:
        """Put back a :meth:`snapshot` (in place, so views and graphs stay valid)."""
        for dst, src in zip([self.a, *self.resident], saved, strict=True):
            dst.copy_(src)


@dataclass
class StepResult:
    """What one iteration gives back.

    Attributes
    ----------
    values : torch.Tensor
        ``2K`` float64 on the device: for model ``k``, ``||X - M_k||^2`` at
        ``2k`` and its count of all-zero columns at ``2k + 1`` (the one host
        transfer of an iteration).
    t : torch.Tensor
        ``R_total x I_1 x ... x I_d`` float64, ``X x_0 A^T`` of the pass.
    ata : torch.Tensor
        ``R_total x R_total`` float64, ``A^T A`` of the pass (all blocks).
    norm2 : float or None
        ``||X||^2`` when this pass measured it.
    """

    values: torch.Tensor
    t: torch.Tensor
    ata: torch.Tensor
    norm2: float | None = None


def _overflowed(compute_dtype: torch.dtype, what: str) -> None:
    """Refuse a fit whose numbers left the compute dtype, with the likely cause and the fix."""
    name = str(compute_dtype).removeprefix("torch.")
    raise NumericalError(
        f"{what} overflowed {name} or became singular: the data is finite, but its samples "
        f"differ in magnitude by more than {name} can hold in products of them (peekcore "
        "rescales data by the magnitude of a few sampled samples); fit with dtype='float64', "
        "or bring the samples to comparable magnitudes (e.g. normalize each)"
    )


def step(problem, stack: Stack, norm2: float | None) -> StepResult:
    """One pass over the data and the resident updates of every stacked model.

    With ``norm2=None`` the pass also measures ``||X||^2`` and vets every chunk
    (NaN/Inf, and negative values for a nonnegative fit), which stops the host
    at each chunk; otherwise nothing here waits for the device.

    Parameters
    ----------
    problem : Problem
    stack : Stack
        Changed in place: ``a`` (by the pass) and ``resident``.
    norm2 : float or None
        ``||X||^2`` if known.

    Returns
    -------
    StepResult
    """
    source, kern, settings = problem.source, problem.kernel, problem.settings
    method = settings.method
    dims = problem.shape[1:]
    width = math.prod(dims)
    n_modes = len(dims)
    mask, seg, stacked = stack.mask, stack.seg, stack.resident
    grams = [(f.T @ f) * mask for f in stacked]
    g_full = hadamard(grams)
    stats_dtype = settings.compute_dtype  # ALS solves: see with_noise_floor
    blocks = (seg, len(stack.ranks))  # solves treat each stacked model on its own scale
    g = (
        gram_inverse(with_noise_floor(g_full, stats_dtype, *blocks), *blocks)
        if method == ALS
        else g_full
    )
    factors = kern.prepare_factors(stacked, settings.compute_dtype)
    a = stack.a
    r_total = a.shape[1]
    stats = kern.new_statistics(r_total, width, settings.compute_dtype)
    want_norm = norm2 is None
    total = 0.0
    base = first_sample(source)  # errors name samples of the whole data
    fixed = settings.fixed_modes
    for offset, chunk in pass_chunks(source, settings.chunk_size, kern):
        if want_norm and method != ALS:
            check_nonnegative(chunk, base + offset)
        if 0 in fixed:  # the sample factor stays: statistics only
            rows = a[offset : offset + chunk.shape[0]]
            n2 = accumulate_given_rows(chunk.reshape(rows.shape[0], width), rows, stats, want_norm)
        else:
            n2 = kern.pass_chunk(
                chunk.reshape(chunk.shape[0], width),
                factors,
                g,
                a[offset : offset + chunk.shape[0]],
                stats,
                dims=dims,
                update=method,
                sweeps=settings.sweeps,
                want_norm=want_norm,
                blocks=stack.ranks,
            )
        if want_norm:
            n2 = float(n2)
            check_finite(n2, base + offset, chunk, settings.compute_dtype)
            total += n2
    comm = problem.comm
    comm.allreduce_(stats.t)  # a data-parallel fit sums its statistics here
    comm.allreduce_(stats.ata)
    measured = None
    if want_norm:
        norm2 = measured = comm.allreduce_scalar(total, problem.device)
        check_not_all_zeros(norm2)
    t_all = stats.t.to(torch.float64).reshape((r_total, *dims))
    ata = stats.ata * mask
    if want_norm and not bool(torch.isfinite(t_all).all() & torch.isfinite(ata).all()):
        _overflowed(settings.compute_dtype, "the pass's statistics (A^T A, X x_0 A^T)")
    mttkrp = ResidentMTTKRP(t_all)
    for m in range(n_modes):
        if m + 1 in fixed and m < n_modes - 1:  # the last mode's MTTKRP gives <X, M> below
            continue
        mt = mttkrp(m, stacked)
        if m + 1 in fixed:
            continue
        gm = hadamard([ata] + [grams[k] for k in range(n_modes) if k != m])
        try:
            if method == ALS:
                solved = als_solve(mt, with_noise_floor(gm, stats_dtype, *blocks), *blocks)
            else:
                solved = kern.hals_update(stacked[m], mt, gm, settings.sweeps, stack.ranks)
        except torch.linalg.LinAlgError as err:
            _overflowed(settings.compute_dtype, f"the update of mode {m + 1} ({err})")
        stacked[m].copy_(solved)
        grams[m] = (stacked[m].T @ stacked[m]) * mask
    k_models = len(stack.ranks)
    dev = mask.device
    inner = torch.zeros(k_models, dtype=torch.float64, device=dev)
    inner.index_add_(0, seg, torch.sum(mt * stacked[-1], dim=0))
    model2 = torch.zeros(k_models, dtype=torch.float64, device=dev)
    model2.index_add_(0, seg, torch.sum(hadamard([ata, *grams]), dim=1))
    dead = torch.zeros(k_models, dtype=torch.float64, device=dev)
    if method != ALS:  # a zero column has a zero Gram diagonal
        for gram in (ata, *grams):
            dead.index_add_(0, seg, (torch.diagonal(gram) <= 0).to(torch.float64))
    values = torch.stack([norm2 - 2 * inner + model2, dead], dim=1).flatten()
    return StepResult(values, t_all, stats.ata, measured)


def residual(
    problem, a: torch.Tensor, resident: list[torch.Tensor], norm2: float | None
) -> tuple[float, float]:
    """``||X - M||^2`` of a model given by its factors, and ``||X||^2``, in one pass.

    Nothing is updated: the pass accumulates ``T = X x_0 A^T`` and ``A^T A``
    from the given sample factor, then ``<X, M>`` is ``T`` contracted with the
    resident factors and ``||M||^2`` the sum of the Hadamard product of the
    Grams. With ``norm2=None`` the pass measures ``||X||^2`` and vets the data
    as the first pass of a fit does (so that fit's first iteration need not).

    Parameters
    ----------
    problem : Problem
    a : torch.Tensor
        ``N x R`` sample factor (this process's rows), compute dtype.
    resident : list of torch.Tensor
        ``I_m x R`` float64.
    norm2 : float or None

    Returns
    -------
    resid2, norm2 : float
    """
    source, settings = problem.source, problem.settings
    dims = problem.shape[1:]
    width = math.prod(dims)
    rank = a.shape[1]
    dev = problem.kernel.device
    stats = PassStatistics(
        t=torch.zeros((rank, width), dtype=settings.compute_dtype, device=dev),
        ata=torch.zeros((rank, rank), dtype=torch.float64, device=dev),
    )
    want_norm = norm2 is None
    total = 0.0
    base = first_sample(source)
    for offset, chunk in pass_chunks(source, settings.chunk_size, problem.kernel):
        if want_norm and settings.method != ALS:
            check_nonnegative(chunk, base + offset)
        rows = a[offset : offset + chunk.shape[0]]
        n2 = accumulate_given_rows(chunk.reshape(rows.shape[0], width), rows, stats, want_norm)
        if want_norm:
            check_finite(n2, base + offset, chunk, settings.compute_dtype)
            total += n2
    comm = problem.comm
    comm.allreduce_(stats.t)
    comm.allreduce_(stats.ata)
    if want_norm:
        norm2 = comm.allreduce_scalar(total, problem.device)
        check_not_all_zeros(norm2)
    t_all = stats.t.to(torch.float64).reshape((rank, *dims))
    mt = ResidentMTTKRP(t_all)(len(dims) - 1, resident)
    inner = float(torch.sum(mt * resident[-1]))
    model2 = float(torch.sum(hadamard([stats.ata, *(f.T @ f for f in resident)])))
    return norm2 - 2.0 * inner + model2, float(norm2)
