"""Streaming CP-ALS: one pass over the data per iteration."""

from __future__ import annotations

from typing import Any

from ..kernels import ALS
from ..model import CPModel
from .engine import FitOptions, fit_streaming

__all__ = ["cp_als"]


@FitOptions.shown_in()
def cp_als(data: Any, rank: int, **options: Any) -> CPModel:
    """CP decomposition by alternating least squares, streamed over the sample mode.

    Each iteration reads the data once: every chunk's rows of the sample factor
    are solved and ``T = X x_0 A^T`` is accumulated, from which the resident
    factors are updated (shared/DESIGN.md). Results equal a dense ALS with the
    same initialization and update order, to rounding, for any chunking.
    The keyword options are :class:`~peekcore.solvers.engine.FitOptions`, which
    :func:`peekcore.ncp_hals` shares.

    Parameters
    ----------
    data : array, tensor, path or chunk source
        ``N x I_1 x ... x I_d`` (``d >= 2``), mode 0 the samples: a numpy array
        or memmap, a torch tensor, a ``.npy`` path (read lazily), or a chunk
        source (``peekcore.sources``). Stored as float16, bfloat16, float32 or
        float64.
    rank : int
        Number of components ``R``.
    n_iter_max : int
        Maximum number of iterations (passes).
    tol : float
        Stop when ``|fit_k - fit_{k-1}| <= tol * |fit_{k-1}|``.
    init : {"random", "gram"}, CPModel or TensorLy CPTensor
        ``"random"``: standard normal factors from ``random_state``. ``"gram"``:
        leading eigenvectors of each resident mode's Gram matrix, accumulated in
        one streamed pass. A model: its factors (weights folded into mode 0).
    random_state : int or None
        Seed for the random initialization: ``None`` or a nonnegative integer
        (numpy integers too), stored with the model; not a generator.
    chunk_size : int, optional
        Samples per chunk; default from ``max_chunk_bytes`` (64 MiB).
    max_chunk_bytes : int, optional
        Bytes of stored data per chunk when ``chunk_size`` is not given.
    dtype : {"float32", "float64"}, optional
        Accumulation precision; default float64 for float64 data, else float32.
        ``R x R`` solves always run in float64.
    device : str or torch.device
        ``"cpu"`` or a CUDA device.
    kernel : {"native", "torch"} or PassKernel, optional
        Pass implementation; default the C++ extension on the CPU.
    callback : callable, optional
        Called with an :class:`IterationInfo` after each iteration; a true
        return value stops the fit.
    progress : bool, optional
        Show a progress bar; default (None): as ``PEEKCORE_PROGRESS`` says
        (``0`` or ``1``) where set, else when stderr is a terminal.
    checkpoint : path, optional
        Write the fit state here (atomically) every ``checkpoint_every`` iterations.
        One fit at a time writes a checkpoint file: another process's fit with
        the same ``checkpoint`` is refused at its start (``ConcurrentWriteError``).
    checkpoint_every : int
        Iterations between checkpoints.
    resume : path, optional
        Continue from a checkpoint; the result equals an uninterrupted fit (also
        on another number of processes).
    distributed : bool, optional
        Data-parallel over the sample mode on torch.distributed: ``None`` (default)
        when a process group with several processes is initialized, ``True`` to
        initialize it from torchrun's environment, ``False`` never. Every process
        passes the whole data and reads only its rows; every process returns the
        same model (see ``peekcore.distributed``).
    fixed_modes : list of int, optional
        Modes whose factors keep their initial values (0 the sample mode), as
        TensorLy's ``fixed_modes``; meaningful with a model as ``init``. With
        mode 0 fixed the pass accumulates its statistics from the given sample
        factor instead of solving it.

    Returns
    -------
    CPModel
        Normalized: weights nonincreasing, unit-norm columns, deterministic signs.
    """
    return fit_streaming(data, rank, ALS, FitOptions.given_to(cp_als, options))
