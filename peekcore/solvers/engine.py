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

import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validate import check_device, check_output_file
from .._version import __version__
from ..distributed import Communicator, ShardSource, communicator
from ..kernels import HALS, PassKernel, get_kernel
from ..model import CPModel, FitHistory, normalize_factors
from ..sources import ChunkSource, as_source, describe_source, dtype_name, natural_chunk_size
from .checkpoint import (
    check_resumed_norm2,
    checkpoint_key,
    load_checkpoint,
    measure_norm2,
    save_checkpoint,
)
from .checks import (
    NATURAL_CHUNK_ALONE_BYTES,
    check_checkpoint_every,
    check_fixed_modes,
    check_iterations,
    check_random_state,
    check_rank,
    check_shape,
    chunk_size_for,
    compute_dtype_for,
)
from .graphs import MIN_ITERATIONS_LEFT, GraphedStep, capture_step, graphs_allowed
from .init import Initializer
from .iteration import Stack, step
from .passes import default_chunk_bytes
from .scaling import ScaledSource, choose_scale, unscaled

__all__ = [
    "IterationInfo",
    "ModelState",
    "RunSettings",
    "Problem",
    "prepare",
    "run_models",
    "finish_model",
    "fit_streaming",
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


@dataclass
class RunSettings:
    """Validated solver settings shared by every model of a run."""

    method: str
    n_iter_max: int
    tol: float
    chunk_size: int
    compute_dtype: torch.dtype
    sweeps: int
    checkpoint: Path | None = None
    checkpoint_every: int = 1
    # modes whose factors stay at their initial values (0 the sample mode)
    fixed_modes: tuple[int, ...] = ()


@dataclass
class ModelState:
    """One model while it is being fitted.

    Attributes
    ----------
    rank, seed : int
    a : torch.Tensor
        ``N x R`` sample factor in the compute dtype, on the kernel's device.
    resident : list of torch.Tensor
        ``I_m x R`` float64 resident factors.
    history : FitHistory
    active : bool
        Still iterating.
    statistics : tuple, optional
        ``(T, AtA)`` of the model's last pass (``R x I_1 x ... x I_d`` and
        ``R x R``, float64), in the scale of ``a`` and ``resident``; kept when
        ``run_models(keep_statistics=True)``.
    graphed : int
        Iterations replayed from a CUDA graph (``peekcore.solvers.graphs``).
    cancelled : bool
        Its residual came out clearly negative once (warned).
    """

    rank: int
    seed: int | None
    a: torch.Tensor
    resident: list[torch.Tensor]
    history: FitHistory = field(default_factory=FitHistory)
    active: bool = True
    dead_seen: bool = False
    statistics: tuple[torch.Tensor, torch.Tensor] | None = None
    graphed: int = 0
    cancelled: bool = False


@dataclass
class Problem:
    """A validated data source, kernel and settings (what ``prepare`` returns).

    ``shape`` is the whole data's; in a data-parallel fit ``source`` holds this
    process's rows ``comm.lo .. comm.hi`` of it. ``source`` reads the data
    multiplied by ``scale``, a power of two (``peekcore.solvers.scaling``;
    1.0 unless the data's magnitude is far from 1): the factors, statistics and
    ``||X||^2`` of a run are in that scale, and :func:`finish_model` undoes it.
    """

    source: ChunkSource
    shape: tuple[int, ...]
    stored: str
    kernel: PassKernel
    device: torch.device
    settings: RunSettings
    comm: Communicator = field(default_factory=Communicator)
    #: where the data came from (``sources.describe_source``), recorded in results
    origin: dict = field(default_factory=dict)
    scale: float = 1.0


def prepare(
    data: Any,
    *,
    method: str,
    n_iter_max: int,
    tol: float,
    chunk_size: int | None,
    max_chunk_bytes: int | None,
    dtype: Any,
    device: str | torch.device,
    kernel: str | PassKernel | None,
    sweeps: int,
    checkpoint: str | Path | None,
    checkpoint_every: int,
    distributed: bool | None = None,
    fixed_modes: Any = None,
) -> Problem:
    """Check the arguments of a fit and pick its kernel, chunking and process shard."""
    source = unscaled(as_source(data))  # a nested fit (a sweep's refinement) scales anew
    shape = check_shape(tuple(int(n) for n in source.shape))
    whole = source
    comm = communicator(distributed, shape[0], natural_chunk_size(source) or 1)
    if comm.active:
        source = ShardSource(source, comm.lo, comm.hi)
    stored = dtype_name(source.dtype)
    n_iter_max, tol, sweeps = check_iterations(n_iter_max, tol, sweeps)
    compute = compute_dtype_for(stored, dtype)
    # every process samples the whole data, so all pick the same scale
    scale = choose_scale(whole, compute)
    if scale != 1.0:
        source = ScaledSource(source, scale)
    checkpoint_every = check_checkpoint_every(checkpoint_every)
    if checkpoint is not None and comm.rank == 0:  # before any pass: none is lost to it
        check_output_file(checkpoint, "checkpoints")
    dev = check_device(device)
    kern = get_kernel(kernel, dev)
    settings = RunSettings(
        method=method,
        n_iter_max=n_iter_max,
        tol=tol,
        chunk_size=chunk_size_for(
            shape,
            stored,
            chunk_size,
            max_chunk_bytes,
            default_chunk_bytes(source, kern),
            natural_chunk_size(source),
            # on a GPU fewer, larger chunks pay more than a saved host copy
            NATURAL_CHUNK_ALONE_BYTES if kern.device.type != "cuda" else None,
        ),
        compute_dtype=compute,
        sweeps=sweeps if method == HALS else 0,
        checkpoint=Path(checkpoint) if checkpoint is not None else None,
        checkpoint_every=checkpoint_every,
        fixed_modes=check_fixed_modes(fixed_modes, len(shape)),
    )
    return Problem(source, shape, stored, kern, dev, settings, comm, describe_source(data), scale)


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
    stats_eps = torch.finfo(settings.compute_dtype).eps  # rounding of the pass's sums
    method = settings.method
    bar = tqdm(
        total=settings.n_iter_max,
        initial=start_iter,
        desc=desc,
        unit="it",
        # bars only on a terminal unless asked: in a log file they are lines of \r updates
        disable=(not sys.stderr.isatty() if progress is None else not progress)
        or problem.comm.rank != 0,
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
                if not math.isfinite(resid2):
                    raise FloatingPointError(
                        f"the fit became non-finite at iteration {it + 1}: the data changed "
                        "between passes or holds NaN/Inf (checked in the first pass only), or "
                        "the model overflowed the compute dtype (try dtype='float64')"
                    )
                if resid2 < -CANCELLATION_ULPS * stats_eps * norm2 and not s.cancelled:
                    s.cancelled = True
                    warnings.warn(
                        f"rank {s.rank}, iteration {it + 1}: the residual came out negative "
                        f"({resid2 / norm2:.1e} of ||X||^2), so the model's components cancel "
                        "each other beyond the precision of the statistics and the reported "
                        "fit is not its real fit; the rank is likely above what the data "
                        "holds: fit a lower rank, or pass dtype='float64'",
                        RuntimeWarning,
                        stacklevel=2,
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


def new_state(
    initializer: Initializer,
    rank: int,
    seed: int | None,
    compute: torch.dtype,
    comm: Communicator | None = None,
) -> ModelState:
    """A model at its initial factors (this process's rows of the sample factor)."""
    a64, resident = initializer.factors(rank, seed)
    if comm is not None and comm.active:
        a64 = a64[comm.lo : comm.hi]
    return ModelState(rank, seed, a64.to(compute).contiguous(), resident)


def fit_streaming(
    data: Any,
    rank: Any,
    *,
    method: str,
    n_iter_max: int,
    tol: float,
    init: Any,
    random_state: int | None,
    chunk_size: int | None,
    max_chunk_bytes: int | None,
    dtype: Any,
    device: str | torch.device,
    kernel: str | PassKernel | None,
    callback: Callable[[IterationInfo], Any] | None,
    progress: bool | None,
    sweeps: int = 1,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: str | Path | None = None,
    distributed: bool | None = None,
    fixed_modes: Any = None,
) -> CPModel:
    """Fit one CP model by streaming passes (the body of ``cp_als`` / ``ncp_hals``)."""
    random_state = check_random_state(random_state)  # a seed: stored with the model
    problem = prepare(
        data,
        method=method,
        n_iter_max=n_iter_max,
        tol=tol,
        chunk_size=chunk_size,
        max_chunk_bytes=max_chunk_bytes,
        dtype=dtype,
        device=device,
        kernel=kernel,
        sweeps=sweeps,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        distributed=distributed,
        fixed_modes=fixed_modes,
    )
    rank = check_rank(rank, problem.shape)
    settings = problem.settings
    initializer = Initializer(
        init,
        problem.source,
        nonneg=method == HALS,
        chunk_size=settings.chunk_size,
        compute_dtype=settings.compute_dtype,
        device=problem.device,
        comm=problem.comm,
    )
    t_init = time.perf_counter()
    check_norm2 = None
    if resume is not None:
        placeholder = [torch.empty(0)] * (len(problem.shape) - 1)
        state = ModelState(rank, random_state, torch.empty(0), placeholder)
        key = checkpoint_key(problem, [state], initializer.name)
        recorded, start = load_checkpoint(Path(resume), key, [state], problem.device, problem.comm)
        state.a = state.a.to(settings.compute_dtype).contiguous()
        # the first resumed pass measures ||X||^2 again: the rest of the data is checked too
        norm2 = None
        check_norm2 = partial(
            check_resumed_norm2, Path(resume), recorded, dtype=settings.compute_dtype
        )
        if not state.active or start >= settings.n_iter_max:  # no pass left to measure it
            check_norm2(measure_norm2(problem))
    else:
        state = new_state(initializer, rank, random_state, settings.compute_dtype, problem.comm)
        state.history.init_seconds = time.perf_counter() - t_init
        key = checkpoint_key(problem, [state], initializer.name) if settings.checkpoint else None
        norm2, start = initializer.norm2, 0
    run_models(
        problem,
        [state],
        norm2=norm2,
        start_iter=start,
        callback=callback,
        progress=progress,
        desc="ncp_hals" if method == HALS else "cp_als",
        key=key,
        check_norm2=check_norm2,
    )
    return finish_model(problem, state, initializer.name)
