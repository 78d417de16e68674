"""The streaming fit loop shared by ``cp_als``, ``ncp_hals`` and ``rank_sweep``.

One iteration = one pass over the data (``PassKernel.pass_chunk`` on every
chunk) followed by the resident updates from the pass statistics. Several
models (ranks, replicates) share each pass: their factors are stacked side by
side, the Gram solve is block diagonal, and the statistics split per model, so
the data is read once per iteration for all of them. A model that has
converged leaves the stack; the others go on. The first pass also measures
``||X||^2`` and checks every chunk for NaN/Inf (and for negative values in a
nonnegative fit).

An iteration itself is ``peekcore.solvers.iteration.step``; on a GPU with
the data on the card, it is replayed as a CUDA graph after the first pass
(``peekcore.solvers.graphs``). This module keeps the loop: convergence,
progress, checkpoints, callbacks.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._lock import writer_lock
from .._options import SharedOptions
from .._progress import resolve_progress
from .._version import __version__
from ..distributed import Communicator
from ..errors import NumericalError
from ..kernels import HALS, PassKernel
from ..model import CPModel, normalize_factors
from .checkpoint import (
    check_resumed_norm2,
    checkpoint_key,
    load_checkpoint,
    measure_norm2,
    save_checkpoint,
)
from .checks import check_random_state, check_rank
from .graphs import MIN_ITERATIONS_LEFT, GraphedStep, capture_step, graphs_allowed
from .iteration import Stack, step

# what callers imported from here before problem.py held them
from .problem import ModelState, Problem, RunSettings, new_state, prepare

__all__ = [
    "FitOptions",
    "Fitted",
    "IterationInfo",
    "ModelState",
    "Problem",
    "RunSettings",
    "finish_model",
    "fit_models",
    "fit_streaming",
    "new_state",
    "prepare",
    "run_models",
]

# a residual below -CANCELLATION_ULPS units of the statistics' rounding (times ||X||^2)
# cannot come from rounding alone: the components cancel (see run_models' warning)
CANCELLATION_ULPS = 1000.0


@dataclass(frozen=True)
class IterationInfo:
    """What a ``callback`` receives after each iteration."""

    iteration: int
    fit: float
    rel_error: float
    seconds: float


# ---------------------------------------------------------------- dead components


def reseed_dead(
    state: ModelState, grams: list[torch.Tensor], iteration: int, comm: Communicator
) -> None:
    """Give components that HALS cannot move again a fresh nonnegative start (in place).

    HALS updates column ``r`` of mode ``m`` by
    ``f_r <- max(0, f_r + (m_r - F g_r) / g_rr)`` with
    ``g_rr = prod_{k != m} ||f_{k,r}||^2`` (the Hadamard product of the other
    modes' Grams, ``A^T A`` among them for a resident mode), and leaves it as is
    when ``g_rr == 0``. So what a zero column does depends on how many of its
    component's columns are zero:

    * one (mode ``p``): its own update divides by the other modes' column
      norms, which are not zero, and refills it from the residual; meanwhile the
      component's other columns wait (their ``g_rr`` holds ``||f_{p,r}||^2 = 0``).
      It recovers by itself, as in plain HALS: the sample factor of
      ``init="gram"`` (zero until the first pass solves it), or a sample column
      that a pass clamped to zero and the next one fills again. If the residual
      keeps it at zero, that is a fixed point of HALS, not a dead end: it can
      move whenever the other components change. It is left alone.
    * two or more (modes ``p`` and ``q``): ``p``'s update divides by
      ``||f_{q,r}||^2 = 0`` and ``q``'s by ``||f_{p,r}||^2 = 0``, every other
      mode's by both: no update can ever move the component again. It is dead.

    The zero columns of a dead component are replaced by uniform random ones,
    scaled to the mean norm of their factor's nonzero columns, drawn from a
    generator seeded by (seed, iteration, mode) so that resumed fits repeat it.
    Each replaced column is recorded in ``history.reseeds``.
    """
    seed = state.seed if state.seed is not None else 0
    a = state.a
    factors = [(0, a, comm.allreduce_(torch.sum(a.to(torch.float64) ** 2, dim=0)))]
    factors += [(m + 1, f, torch.diagonal(grams[m])) for m, f in enumerate(state.resident)]
    zero_columns = sum((diag <= 0).to(torch.int64).cpu() for _, _, diag in factors)
    is_dead = zero_columns >= 2
    if not bool(is_dead.any()):
        return
    for mode, f, diag in factors:
        dead = torch.nonzero((diag <= 0).cpu() & is_dead).flatten().tolist()
        if not dead:
            continue
        rng = np.random.default_rng([seed, iteration, mode])
        live = diag > 0
        scale = float(torch.sqrt(diag[live]).mean()) if bool(live.any()) else 1.0
        for r in dead:
            # the sample mode draws all N rows and keeps this process's, as one process would
            u = torch.as_tensor(rng.random(comm.n if mode == 0 else f.shape[0]), dtype=f.dtype)
            u = u * (scale / max(float(torch.linalg.norm(u)), 1e-300))
            f[:, r] = (u[comm.lo : comm.hi] if mode == 0 else u).to(f.device)
            state.history.reseeds.append({"iteration": iteration + 1, "mode": mode, "component": r})
        if mode > 0:
            grams[mode - 1] = f.T @ f


# ---------------------------------------------------------------- the loop


def _record(
    s: ModelState, resid2: float, it: int, seconds: float, norm2: float, settings: RunSettings
) -> None:
    """One iteration of one model: vet its residual, extend its history, stop it at ``tol``.

    A residual below -CANCELLATION_ULPS units of the statistics' rounding
    (times ``||X||^2``) is warned about once per model.
    """
    if not math.isfinite(resid2):
        raise NumericalError(
            f"the fit became non-finite at iteration {it + 1}: the data changed "
            "between passes or holds NaN/Inf (checked in the first pass only), or "
            "the model overflowed the compute dtype (try dtype='float64')"
        )
    if (
        resid2 < -CANCELLATION_ULPS * torch.finfo(settings.compute_dtype).eps * norm2
        and not s.cancelled
    ):
        s.cancelled = True
        warnings.warn(
            f"rank {s.rank}, iteration {it + 1}: the residual came out negative "
            f"({resid2 / norm2:.1e} of ||X||^2), so the model's components cancel "
            "each other beyond the precision of the statistics and the reported "
            "fit is not its real fit; the rank is likely above what the data "
            "holds: fit a lower rank, or pass dtype='float64'",
            RuntimeWarning,
            stacklevel=3,
        )
    rel = math.sqrt(max(resid2, 0.0) / norm2)
    h = s.history
    h.fit.append(1.0 - rel)
    h.rel_error.append(rel)
    h.seconds.append(seconds)
    h.inner_sweeps.append(settings.sweeps)
    if len(h.fit) >= 2:
        prev = h.fit[-2]
        if abs(h.fit[-1] - prev) <= settings.tol * max(abs(prev), 1e-12):
            h.converged = True
            h.stop_reason = "tol"
            s.active = False


def run_models(
    problem: Problem,
    states: list[ModelState],
    *,
    norm2: float | None,
    start_iter: int = 0,
    callback: Callable[[IterationInfo], Any] | None = None,
    progress: bool | None = None,
    desc: str = "fit",
    key: dict | None = None,
    keep_statistics: bool = False,
    check_norm2: Callable[[float], Any] | None = None,
) -> float:
    """Iterate every active model until it converges or ``n_iter_max`` passes are done.

    With ``keep_statistics``, each model's ``statistics`` holds ``(T, AtA)`` of
    its last pass when it stops (for diagnostics such as core consistency).
    Returns ``||X||^2`` (measured by the first pass when not given, and then
    handed to ``check_norm2``: a resumed fit compares it with its checkpoint's).
    """
    from tqdm.auto import tqdm

    settings = problem.settings
    method = settings.method
    bar = tqdm(
        total=settings.n_iter_max,
        initial=start_iter,
        desc=desc,
        unit="it",
        # bars only on a terminal unless asked (see peekcore._progress); one bar, rank 0's
        disable=not resolve_progress(progress) or problem.comm.rank != 0,
        leave=False,
    )
    stack: Stack | None = None
    graphed: GraphedStep | None = None
    use_graphs = graphs_allowed(problem) and not settings.fixed_modes
    try:
        for it in range(start_iter, settings.n_iter_max):
            active = [s for s in states if s.active]
            if not active:
                break
            t0 = time.perf_counter()
            if method == HALS and not settings.fixed_modes:  # fixed factors are never changed
                for s in active:
                    if it == start_iter or s.dead_seen:  # writes into the stack's columns
                        reseed_dead(s, [f.T @ f for f in s.resident], it, problem.comm)
            if stack is None or not stack.holds(active):
                if stack is not None:
                    for s in stack.states:
                        if not s.active:
                            Stack.release(s)
                stack, graphed = Stack.of(active), None  # a model left: a new stack
            # The pass that measures ||X||^2 also vets the data; when a Gram pass
            # measured it (init="gram"), that pass already did.
            if graphed is not None:
                result = graphed()
            elif (
                use_graphs and norm2 is not None and settings.n_iter_max - it >= MIN_ITERATIONS_LEFT
            ):
                graphed, result = capture_step(problem, stack, norm2)
                use_graphs = graphed is not None
            else:
                result = step(problem, stack, norm2)
            if norm2 is None:
                norm2 = result.norm2
                if check_norm2 is not None:
                    check_norm2(norm2)
            # the one host transfer of the iteration: residuals and dead-component counts
            values = result.values.tolist()
            seconds = time.perf_counter() - t0
            for k, (s, (lo, hi)) in enumerate(zip(active, stack.columns(), strict=True)):
                resid2, dead_count = values[2 * k], values[2 * k + 1]
                s.dead_seen = dead_count > 0
                s.graphed += graphed is not None
                _record(s, resid2, it, seconds, norm2, settings)
                if keep_statistics and (not s.active or it == settings.n_iter_max - 1):
                    # its own copies: the stack's statistics are refilled next iteration
                    s.statistics = (result.t[lo:hi].clone(), result.ata[lo:hi, lo:hi].clone())
            bar.update(1)
            if len(states) == 1:
                bar.set_postfix(fit=f"{states[0].history.fit[-1]:.6f}")
            else:
                bar.set_postfix(active=sum(s.active for s in states))
            if settings.checkpoint is not None and (it + 1) % settings.checkpoint_every == 0:
                full = [problem.comm.gather_rows(s.a) for s in states]  # every process joins
                if problem.comm.rank == 0:
                    save_checkpoint(settings.checkpoint, key or {}, states, norm2, it + 1, full)
            if callback is not None and len(states) == 1:
                h = states[0].history
                info = IterationInfo(it + 1, h.fit[-1], h.rel_error[-1], h.seconds[-1])
                if callback(info) and states[0].active:
                    h.stop_reason = "callback"
                    states[0].active = False
    finally:
        bar.close()
    for s in states:
        Stack.release(s)
        if s.active:
            s.history.stop_reason = "n_iter_max"
            s.active = False
    return float(norm2) if norm2 is not None else float("nan")


def finish_model(problem: Problem, state: ModelState, init_name: str) -> CPModel:
    """Normalize a fitted model and attach its metadata."""
    settings = problem.settings
    a = problem.comm.gather_rows(state.a)
    mats = [a.to(torch.float64).cpu().numpy()] + [f.cpu().numpy() for f in state.resident]
    weights, factors = normalize_factors(mats)
    weights = weights / problem.scale  # exact: a power of two
    metadata = {
        "shape": list(problem.shape),
        "rank": state.rank,
        "method": settings.method,
        "dtype": problem.stored,
        "compute_dtype": str(settings.compute_dtype).removeprefix("torch."),
        "random_state": state.seed,
        "init": init_name,
        "chunk_size": settings.chunk_size,
        "kernel": problem.kernel.name,
        "device": str(problem.device),
        "processes": problem.comm.world,
        "graphed_iterations": state.graphed,
        "tol": settings.tol,
        "n_iter_max": settings.n_iter_max,
        "sweeps": settings.sweeps,
        "peekcore_version": __version__,
        "torch_version": torch.__version__,
        "source": problem.origin,
    }
    return CPModel(weights, factors, state.history, metadata)


@dataclass
class Fitted:
    """What :func:`fit_models` returns.

    Attributes
    ----------
    states : list of ModelState
        Every model at its last iteration, in the order of the specs.
    norm2 : float
        ``||X||^2`` of the data the models were fitted to (in the problem's scale).
    init_name : str
        The initializer's name (model metadata).
    """

    states: list[ModelState]
    norm2: float
    init_name: str


def fit_models(
    problem: Problem,
    init: Any,
    specs: list[tuple[int, int | None]],
    *,
    norm2: float | None = None,
    resume: str | Path | None = None,
    callback: Callable[[IterationInfo], Any] | None = None,
    progress: bool | None = None,
    desc: str = "fit",
    keep_statistics: bool = False,
) -> Fitted:
    """Fit a model per ``(rank, seed)`` of ``specs`` from ``init``, in shared passes.

    The one entry of ``fit_streaming``, ``rank_sweep`` and the compressed
    sweep: builds the initializer, the models' initial states (or reads them
    from the checkpoint ``resume``), and runs the loop (:func:`run_models`).

    Parameters
    ----------
    problem : Problem
        From :func:`prepare`.
    init : str, CPModel or sequence
        As ``cp_als`` takes it.
    specs : list of (int, int or None)
        Rank and seed of every model.
    norm2 : float, optional
        ``||X||^2`` when already known (else the initializer's, or the first
        pass measures it and vets the data).
    resume : path, optional
        Checkpoint to continue from (its models must match ``specs``); the
        first resumed pass measures ``||X||^2`` again and compares it with the
        checkpoint's.
    callback, progress, desc, keep_statistics
        As for :func:`run_models`.

    Returns
    -------
    Fitted
    """
    settings = problem.settings
    # one writer per checkpoint file, for the whole fit (rank 0 alone writes it)
    with _checkpoint_lock(problem):
        initializer = problem.initializer(init)
        check_norm2 = None
        if resume is not None:
            empty = len(problem.shape) - 1
            states = [
                ModelState(rank, seed, torch.empty(0), [torch.empty(0)] * empty)
                for rank, seed in specs
            ]
            key = checkpoint_key(problem, states, initializer.name)
            recorded, start = load_checkpoint(
                Path(resume), key, states, problem.device, problem.comm
            )
            for s in states:
                s.a = s.a.to(settings.compute_dtype).contiguous()
            # the first resumed pass measures ||X||^2 again: the rest of the data is checked too
            norm2 = None
            check_norm2 = partial(
                check_resumed_norm2, Path(resume), recorded, dtype=settings.compute_dtype
            )
            if not any(s.active for s in states) or start >= settings.n_iter_max:
                check_norm2(measure_norm2(problem))  # no pass left to measure it
        else:
            states = []
            for rank, seed in specs:
                t_init = time.perf_counter()
                s = new_state(initializer, rank, seed, settings.compute_dtype, problem.comm)
                s.history.init_seconds = time.perf_counter() - t_init
                states.append(s)
            key = checkpoint_key(problem, states, initializer.name) if settings.checkpoint else None
            norm2, start = (initializer.norm2 if norm2 is None else norm2), 0
        norm2 = run_models(
            problem,
            states,
            norm2=norm2,
            start_iter=start,
            callback=callback,
            progress=progress,
            desc=desc,
            key=key,
            keep_statistics=keep_statistics,
            check_norm2=check_norm2,
        )
    return Fitted(states, norm2, initializer.name)


def _checkpoint_lock(problem: Problem) -> Any:
    """The writer lock of the fit's checkpoint file (:mod:`peekcore._lock`), if it writes one."""
    checkpoint = problem.settings.checkpoint
    if checkpoint is None or problem.comm.rank != 0:
        return contextlib.nullcontext()
    return writer_lock(
        checkpoint,
        "the checkpoint",
        "Wait until that fit has finished (then resume from its checkpoint), or give this "
        "fit another checkpoint path",
    )


# FitOptions fields that fit_models takes; prepare takes the others
_FIT_FIELDS = ("init", "random_state", "callback", "progress", "resume")


@dataclass(frozen=True)
class FitOptions(SharedOptions):
    """The keyword options that :func:`peekcore.cp_als` and :func:`peekcore.ncp_hals`
    share, listed once (shown in both signatures by ``FitOptions.shown_in``).

    Each field means what the argument of the same name of :func:`peekcore.cp_als`
    means (its docstring describes them); nothing is checked until :func:`prepare`
    and :func:`fit_models` read them. ``ncp_hals`` adds ``sweeps``.
    """

    n_iter_max: int = 100
    tol: float = 1e-8
    init: Any = "random"
    random_state: int | None = 0
    chunk_size: int | None = None
    max_chunk_bytes: int | None = None
    dtype: Any = None
    device: str | torch.device = "cpu"
    kernel: str | PassKernel | None = None
    callback: Callable[[IterationInfo], Any] | None = None
    progress: bool | None = None
    checkpoint: str | Path | None = None
    checkpoint_every: int = 1
    resume: str | Path | None = None
    distributed: bool | None = None
    fixed_modes: Any = None

    def for_prepare(self) -> dict[str, Any]:
        """The options :func:`prepare` takes, by name (all but fit_models' five)."""
        names = [f.name for f in fields(self) if f.name not in _FIT_FIELDS]
        return {name: getattr(self, name) for name in names}


def fit_streaming(
    data: Any, rank: Any, method: str, options: FitOptions, sweeps: int = 1
) -> CPModel:
    """Fit one CP model by streaming passes (the body of ``cp_als`` / ``ncp_hals``).

    Parameters
    ----------
    data, rank
        As for :func:`peekcore.cp_als`.
    method : {ALS, HALS}
    options : FitOptions
        The call's keyword options.
    sweeps : int
        HALS sweeps per factor update (``ncp_hals``'s own option).

    Returns
    -------
    CPModel
        Normalized (:func:`finish_model`).
    """
    random_state = check_random_state(options.random_state)  # a seed: stored with the model
    problem = prepare(data, method=method, sweeps=sweeps, **options.for_prepare())
    rank = check_rank(rank, problem.shape)
    fitted = fit_models(
        problem,
        options.init,
        [(rank, random_state)],
        resume=options.resume,
        callback=options.callback,
        progress=options.progress,
        desc="ncp_hals" if method == HALS else "cp_als",
    )
    return finish_model(problem, fitted.states[0], fitted.init_name)
