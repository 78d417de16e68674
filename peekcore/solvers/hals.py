"""Streaming nonnegative CP by HALS: one pass over the data per iteration."""

from __future__ import annotations

from typing import Any

from ..kernels import HALS
from ..model import CPModel
from .engine import FitOptions, fit_streaming

__all__ = ["ncp_hals"]


@FitOptions.shown_in()
def ncp_hals(data: Any, rank: int, *, sweeps: int = 5, **options: Any) -> CPModel:
    """Nonnegative CP decomposition by HALS, streamed over the sample mode.

    Each iteration reads the data once. Inside the pass every chunk's rows of
    the sample factor get ``sweeps`` HALS sweeps from the chunk's MTTKRP and the
    Gram, and ``T = X x_0 A^T`` accumulates as in :func:`peekcore.cp_als`; the
    resident factors then get ``sweeps`` HALS sweeps each from ``T`` and the
    Grams. Column update: ``f_r <- max(0, f_r + (m_r - F g_r) / g_rr)``.
    A component that HALS can no longer move (two or more of its factor columns
    zero) is re-seeded (``history.reseeds``); one zero column refills by itself.
    The keyword options but ``sweeps`` are
    :class:`~peekcore.solvers.engine.FitOptions`, as for :func:`peekcore.cp_als`.

    Parameters
    ----------
    data : array, tensor, path or chunk source
        Nonnegative ``N x I_1 x ... x I_d`` data (``d >= 2``), as for
        :func:`peekcore.cp_als`. Negative values are refused with the sample
        range that holds them.
    rank : int
        Number of components ``R``.
    n_iter_max, tol : int, float
        Iteration cap and stopping rule ``|fit_k - fit_{k-1}| <= tol * |fit_{k-1}|``.
    init : {"random", "gram"}, CPModel or TensorLy CPTensor
        ``"random"``: uniform [0, 1) factors from ``random_state``. ``"gram"``:
        the positive parts of the leading Gram eigenvectors (one streamed pass).
        A model must be nonnegative.
    sweeps : int
        HALS sweeps per factor update (TensorLy's HALS uses up to 5).
    random_state, chunk_size, max_chunk_bytes, dtype, device, kernel, callback, progress
        As for :func:`peekcore.cp_als`.
    checkpoint, checkpoint_every, resume
        Atomic checkpoints and bit-identical resume, as for :func:`peekcore.cp_als`.
    distributed : bool, optional
        Data-parallel over the sample mode, as for :func:`peekcore.cp_als`.
    fixed_modes : list of int, optional
        Modes whose factors keep their initial values, as for
        :func:`peekcore.cp_als`; dead components are then not re-seeded.

    Returns
    -------
    CPModel
        Nonnegative factors, normalized (weights nonincreasing, unit columns).
    """
    given = FitOptions.given_to(ncp_hals, options)
    return fit_streaming(data, rank, HALS, given, sweeps=sweeps)
