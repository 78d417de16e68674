"""The streaming fit loop shared by ``cp_als``, ``ncp_hals`` and ``rank_sweep``.

One iteration = one pass over the data (``PassKernel.pass_chunk`` on every
chunk) followed by the resident updates from the pass statistics. Several
models (ranks, replicates) share each pass: their factors are stacked side by
side, the Gram solve is block diagonal, and the statistics split per model, so
the data is read once per iteration for all of them. A model that has
converged leaves the stack; the others go on. The first pass also measures
``||X||^2`` and checks every chunk for NaN/Inf (and for negative values in a
nonnegative fit).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..distributed import Communicator, ShardSource, communicator
from ..kernels import ALS, HALS, PassKernel, get_kernel
from ..model import CPModel, FitHistory, normalize_factors
from ..sources import ChunkSource, as_source, dtype_name, natural_chunk_size
from .checkpoint import checkpoint_key, load_checkpoint, save_checkpoint
from .checks import (
    check_iterations,
    check_rank,
    check_shape,
    chunk_size_for,
    compute_dtype_for,
)
from .init import Initializer
from .passes import check_finite, check_nonnegative, default_chunk_bytes, pass_chunks
from .resident import als_solve, gram_inverse, hadamard, resident_mttkrp

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
    """

    rank: int
    seed: int | None
    a: torch.Tensor
    resident: list[torch.Tensor]
    history: FitHistory = field(default_factory=FitHistory)
    active: bool = True
    dead_seen: bool = False
    statistics: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Problem:
    """A validated data source, kernel and settings (what ``prepare`` returns).

    ``shape`` is the whole data's; in a data-parallel fit ``source`` holds this
    process's rows ``comm.lo .. comm.hi`` of it.
    """

    source: ChunkSource
    shape: tuple[int, ...]
    stored: str
    kernel: PassKernel
    device: torch.device
    settings: RunSettings
    comm: Communicator = field(default_factory=Communicator)


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
) -> Problem:
    """Check the arguments of a fit and pick its kernel, chunking and process shard."""
    source = as_source(data)
    shape = check_shape(tuple(int(n) for n in source.shape))
    comm = communicator(distributed, shape[0])
    if comm.active:
        source = ShardSource(source, comm.lo, comm.hi)
    stored = dtype_name(source.dtype)
    n_iter_max, tol, sweeps = check_iterations(n_iter_max, tol, sweeps)
    compute = compute_dtype_for(stored, dtype)
    dev = torch.device(device)
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
        ),
        compute_dtype=compute,
        sweeps=sweeps if method == HALS else 0,
        checkpoint=Path(checkpoint) if checkpoint is not None else None,
        checkpoint_every=max(1, int(checkpoint_every)),
    )
    return Problem(source, shape, stored, kern, dev, settings, comm)


# ---------------------------------------------------------------- dead components


def reseed_dead(
    state: ModelState, grams: list[torch.Tensor], iteration: int, comm: Communicator
) -> None:
    """Give components that HALS drove to zero a fresh nonnegative start (in place).

    A column of a factor that is entirely zero makes its component dead: HALS
    cannot move it again (its Gram diagonal is zero). Such a column is replaced
    by a uniform random one, scaled to the mean norm of the factor's live
    columns, drawn from a generator seeded by (seed, iteration, mode) so that
    resumed fits repeat it. Each event is recorded in ``history.reseeds``.
    """
    seed = state.seed if state.seed is not None else 0
    a = state.a
    factors = [(0, a, comm.allreduce_(torch.sum(a.to(torch.float64) ** 2, dim=0)))]
    factors += [(m + 1, f, torch.diagonal(grams[m])) for m, f in enumerate(state.resident)]
    for mode, f, diag in factors:
        dead = torch.nonzero(diag <= 0).flatten().tolist()
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
) -> float:
    """Iterate every active model until it converges or ``n_iter_max`` passes are done.

    With ``keep_statistics``, each model's ``statistics`` holds ``(T, AtA)`` of
    its last pass when it stops (for diagnostics such as core consistency).
    Returns ``||X||^2`` (measured by the first pass when not given).
    """
    from tqdm.auto import tqdm

    source, kern, settings = problem.source, problem.kernel, problem.settings
    method, compute = settings.method, settings.compute_dtype
    dims = problem.shape[1:]
    width = math.prod(dims)
    n_modes = len(dims)
    bar = tqdm(
        total=settings.n_iter_max,
        initial=start_iter,
        desc=desc,
        unit="it",
        disable=(None if progress is None else not progress) or problem.comm.rank != 0,
        leave=False,
    )
    try:
        for it in range(start_iter, settings.n_iter_max):
            active = [s for s in states if s.active]
            if not active:
                break
            t0 = time.perf_counter()
            if method == HALS:
                for s in active:
                    if it == start_iter or s.dead_seen:
                        reseed_dead(s, [f.T @ f for f in s.resident], it, problem.comm)
            # All models side by side: columns of model k are [lo_k, hi_k). Every
            # Gram-like matrix is block diagonal (``mask``), so one solve, one
            # MTTKRP and one HALS call serve all models (no per-model launches).
            ranks = [s.rank for s in active]
            stacked = [torch.cat([s.resident[m] for s in active], dim=1) for m in range(n_modes)]
            dev = stacked[0].device
            seg = torch.repeat_interleave(
                torch.arange(len(active), device=dev), torch.tensor(ranks, device=dev)
            )
            mask = (seg[:, None] == seg[None, :]).to(torch.float64)
            grams = [(f.T @ f) * mask for f in stacked]
            g_full = hadamard(grams)
            g = gram_inverse(g_full) if method == ALS else g_full
            factors = kern.prepare_factors(stacked, compute)
            if len(active) == 1:
                active[0].a = active[0].a.contiguous()  # kernels write rows in place
                a = active[0].a
            else:
                a = torch.cat([s.a for s in active], 1)
            r_total = a.shape[1]
            stats = kern.new_statistics(r_total, width, compute)
            # The pass that measures ||X||^2 also vets the data; when a Gram pass
            # measured it (init="gram"), that pass already did.
            want_norm = norm2 is None
            blocks = tuple(ranks)
            total = 0.0
            for offset, chunk in pass_chunks(source, settings.chunk_size, kern):
                if want_norm and method == HALS:
                    check_nonnegative(chunk, offset)
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
                    blocks=blocks,
                )
                if want_norm:
                    n2 = float(n2)
                    check_finite(n2, offset, chunk.shape[0])
                    total += n2
            comm = problem.comm
            comm.allreduce_(stats.t)  # a data-parallel fit sums its statistics here
            comm.allreduce_(stats.ata)
            if want_norm:
                norm2 = comm.allreduce_scalar(total, problem.device)
                if norm2 == 0.0:
                    raise ValueError("the data is all zeros: there is nothing to factor")
            t_all = stats.t.to(torch.float64).reshape((r_total, *dims))
            ata = stats.ata * mask
            for m in range(n_modes):
                gm = hadamard([ata] + [grams[k] for k in range(n_modes) if k != m])
                mt = resident_mttkrp(t_all, stacked, m)
                if method == ALS:
                    stacked[m] = als_solve(mt, gm).contiguous()
                else:
                    stacked[m] = kern.hals_update(
                        stacked[m], mt, gm, settings.sweeps, blocks=tuple(ranks)
                    ).contiguous()
                grams[m] = (stacked[m].T @ stacked[m]) * mask
            k_models = len(active)
            inner = torch.zeros(k_models, dtype=torch.float64, device=dev)
            inner.index_add_(0, seg, torch.sum(mt * stacked[-1], dim=0))
            model2 = torch.zeros(k_models, dtype=torch.float64, device=dev)
            model2.index_add_(0, seg, torch.sum(hadamard([ata, *grams]), dim=1))
            dead = torch.zeros(k_models, dtype=torch.float64, device=dev)
            if method == HALS:  # a zero column has a zero Gram diagonal
                for gram in (ata, *grams):
                    dead.index_add_(0, seg, (torch.diagonal(gram) <= 0).to(torch.float64))
            # the one host transfer of the iteration: residuals and dead-component counts
            resid = torch.stack([norm2 - 2 * inner + model2, dead], dim=1).flatten()
            values = resid.tolist()
            pass_stats = []
            lo = 0
            for s in active:
                hi = lo + s.rank
                if len(active) > 1:
                    s.a = a[:, lo:hi]
                s.resident = [f[:, lo:hi].contiguous() for f in stacked]
                pass_stats.append((t_all[lo:hi], stats.ata[lo:hi, lo:hi]))
                lo = hi
            seconds = time.perf_counter() - t0
            for k, s in enumerate(active):
                resid2, dead_count = values[2 * k], values[2 * k + 1]
                s.dead_seen = dead_count > 0
                if not math.isfinite(resid2):
                    raise FloatingPointError(
                        f"the fit became non-finite at iteration {it + 1}: the data changed "
                        "between passes or holds NaN/Inf (checked in the first pass only), or "
                        "the model overflowed the compute dtype (try dtype='float64')"
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
                    t, ata = pass_stats[k]
                    s.statistics = (t.clone(), ata.clone())  # its own slice, not the stack
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
        "tol": settings.tol,
        "n_iter_max": settings.n_iter_max,
        "sweeps": settings.sweeps,
        "peekcore_version": __version__,
        "torch_version": torch.__version__,
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
) -> CPModel:
    """Fit one CP model by streaming passes (the body of ``cp_als`` / ``ncp_hals``)."""
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
    if resume is not None:
        placeholder = [torch.empty(0)] * (len(problem.shape) - 1)
        state = ModelState(rank, random_state, torch.empty(0), placeholder)
        key = checkpoint_key(problem.shape, settings, [state])
        norm2, start = load_checkpoint(Path(resume), key, [state], problem.device, problem.comm)
        state.a = state.a.to(settings.compute_dtype).contiguous()
    else:
        state = new_state(initializer, rank, random_state, settings.compute_dtype, problem.comm)
        state.history.init_seconds = time.perf_counter() - t_init
        key = checkpoint_key(problem.shape, settings, [state])
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
    )
    return finish_model(problem, state, initializer.name)
