"""Rank sweeps: every (rank, replicate) model fitted in the same passes, then diagnosed.

``rank_sweep`` stacks the factors of all models so each chunk is read once per
iteration for all of them (shared/DESIGN.md); a model that has converged
leaves the stack while the others go on. Each model is then scored from the
statistics of its last pass (fit, explained variance, core consistency), the
replicates of each rank are compared (stability, degeneracy), and a rank is
chosen (:func:`peekcore.diagnostics.choose_rank`).

With ``compress=True`` the sweep runs on a compressed copy of the data: the
leading subspaces of the resident modes (from streamed Gram matrices) shrink
every non-sample mode, one pass projects the data (and measures what the
projection leaves out), the whole sweep runs on the small projected tensor,
every model is scored exactly on the full data from those two passes' numbers
(see ``_compressed_sweep``), and the chosen rank gets a few exact passes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from . import diagnostics as diag
from ._io import load_npz, save_npz
from ._validate import check_int, parse_ranks
from ._version import __version__
from .errors import InvalidArgumentError, InvalidTypeError, UnknownNameError
from .kernels import ALS, HALS, PassKernel
from .model import CPModel, FitHistory
from .solvers.checks import check_random_state, check_rank
from .solvers.engine import finish_model, fit_models
from .solvers.passes import check_not_all_zeros, gram_pass, iterate_chunks
from .solvers.problem import ModelState, Problem, prepare
from .sources import ArraySource

__all__ = ["RankSweep", "rank_sweep"]

_METHODS = {"cp": ALS, "ncp": HALS}
#: replicates whose fit is within this of a rank's best count as having found that optimum
STABILITY_FIT_TOL = 1e-3


@dataclass
class RankSweep:
    """Every model of a rank sweep and every diagnostic.

    Arrays are indexed ``[rank_index, replicate]`` (``K x P``) or
    ``[rank_index]`` (``K``), in the order of ``ranks``.

    Attributes
    ----------
    ranks : list of int
    replicates : int
    method : {"cp", "ncp"}
    models : list of list of CPModel
        ``models[k][p]``: rank ``ranks[k]``, replicate ``p`` (seed ``random_state + p``;
        equal to a refit alone with that seed up to rounding, see :func:`rank_sweep`).
    fit, explained_variance : ndarray
        ``K x P``.
    corcondia : ndarray
        ``K x P`` core consistency, Bro-Kiers normalization (divide by R).
    corcondia_core_norm : ndarray
        ``K x P`` core consistency divided by the core's squared norm.
    degeneracy : ndarray
        ``K x P`` most negative congruence between two components.
    stability : ndarray
        ``K`` mean factor match score against the best replicate, over the
        replicates whose fit is within ``STABILITY_FIT_TOL`` (1e-3) of the best:
        did the runs that found the best fit find the same components? (nan
        when fewer than two did.)
    reached_best : ndarray
        ``K`` share of the replicates whose fit is within 1e-3 of the best.
    best : ndarray
        ``K`` index of the best-fitting replicate of each rank.
    chosen_rank : int
    choice_reason : str
    compression : dict
        Empty for an exact sweep; else the subspace sizes, the share of
        ``||X||^2`` they capture, and fits before and after the exact passes.
    seconds : float
        Wall time of the whole sweep.
    metadata : dict
    """

    ranks: list[int]
    replicates: int
    method: str
    models: list[list[CPModel]]
    fit: np.ndarray
    explained_variance: np.ndarray
    corcondia: np.ndarray
    corcondia_core_norm: np.ndarray
    degeneracy: np.ndarray
    stability: np.ndarray
    reached_best: np.ndarray
    best: np.ndarray
    chosen_rank: int
    choice_reason: str
    compression: dict = field(default_factory=dict)
    seconds: float = 0.0
    metadata: dict = field(default_factory=dict)

    def model(self, rank: int | None = None, replicate: int | None = None) -> CPModel:
        """A model of the sweep: the best replicate of ``rank`` (default the chosen rank)."""
        rank = self.chosen_rank if rank is None else rank
        if rank not in self.ranks:
            raise UnknownNameError(f"rank {rank} is not in this sweep (ranks {self.ranks})")
        k = self.ranks.index(rank)
        return self.models[k][int(self.best[k]) if replicate is None else replicate]

    def table(self) -> list[dict]:
        """One row per rank: the best replicate's scores and the rank's stability."""
        rows = []
        for k, r in enumerate(self.ranks):
            b = int(self.best[k])
            rows.append(
                {
                    "rank": r,
                    "fit": float(self.fit[k, b]),
                    "explained_variance": float(self.explained_variance[k, b]),
                    "corcondia": float(self.corcondia[k, b]),
                    "corcondia_core_norm": float(self.corcondia_core_norm[k, b]),
                    "degeneracy": float(self.degeneracy[k, b]),
                    "stability": float(self.stability[k]),
                    "reached_best": float(self.reached_best[k]),
                    "chosen": r == self.chosen_rank,
                }
            )
        return rows

    def __repr__(self) -> str:
        return (
            f"RankSweep(ranks={self.ranks[0]}..{self.ranks[-1]} ({len(self.ranks)}), "
            f"replicates={self.replicates}, method={self.method!r}, "
            f"chosen_rank={self.chosen_rank})"
        )

    # ------------------------------------------------------------------ files
    _ARRAYS = (
        "fit",
        "explained_variance",
        "corcondia",
        "corcondia_core_norm",
        "degeneracy",
        "stability",
        "reached_best",
        "best",
    )

    def save(self, path: str | os.PathLike) -> None:
        """Write the sweep (every model and diagnostic) to one ``.npz``, atomically."""
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        histories = []
        for k, row in enumerate(self.models):
            for p, m in enumerate(row):
                arrays[f"m{k}_{p}_weights"] = m.weights
                for i, f in enumerate(m.factors):
                    arrays[f"m{k}_{p}_factor_{i}"] = f
                histories.append({"history": m.history.__dict__, "metadata": m.metadata})
        header = {
            "format": "peekcore.RankSweep",
            "version": 1,
            "ranks": self.ranks,
            "replicates": self.replicates,
            "method": self.method,
            "n_factors": len(self.models[0][0].factors),
            "chosen_rank": self.chosen_rank,
            "choice_reason": self.choice_reason,
            "compression": self.compression,
            "seconds": self.seconds,
            "metadata": self.metadata,
            "models": histories,
        }
        save_npz(path, arrays, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RankSweep:
        """Read a sweep written by :meth:`save`."""
        header, data = load_npz(path, "peekcore.RankSweep", "rank sweep")
        arrays = {name: data[name] for name in cls._ARRAYS}
        models, j = [], 0
        for k in range(len(header["ranks"])):
            row = []
            for p in range(header["replicates"]):
                info = header["models"][j]
                j += 1
                factors = [data[f"m{k}_{p}_factor_{i}"] for i in range(header["n_factors"])]
                history = FitHistory(**info["history"])
                row.append(CPModel(data[f"m{k}_{p}_weights"], factors, history, info["metadata"]))
            models.append(row)
        return cls(
            ranks=list(header["ranks"]),
            replicates=int(header["replicates"]),
            method=header["method"],
            models=models,
            chosen_rank=int(header["chosen_rank"]),
            choice_reason=header["choice_reason"],
            compression=header["compression"],
            seconds=float(header["seconds"]),
            metadata=header["metadata"],
            **arrays,
        )


# ---------------------------------------------------------------------- fitting


def _check_ranks(ranks: Any, shape: tuple[int, ...]) -> list[int]:
    """Ranks as ``peekcore._validate.parse_ranks`` reads them, each bounded by the shape."""
    return sorted(check_rank(r, shape) for r in parse_ranks(ranks))


def _specs(ranks: list[int], replicates: int, random_state: int) -> list[tuple[int, int]]:
    """(rank, seed) of every model of a sweep: replicate ``p`` seeds ``random_state + p``."""
    return [(r, random_state + p) for r in ranks for p in range(replicates)]


def _score(
    states: list[ModelState],
    models: list[CPModel],
    ranks: list[int],
    replicates: int,
    norm2: float,
) -> dict[str, np.ndarray]:
    """Diagnostics of every model from the statistics of its last pass."""
    shape = (len(ranks), replicates)
    out = {
        name: np.full(shape, np.nan)
        for name in ("fit", "explained_variance", "corcondia", "corcondia_core_norm", "degeneracy")
    }
    for j, (s, m) in enumerate(zip(states, models, strict=True)):
        k, p = divmod(j, replicates)
        t, ata = (x.detach().cpu().numpy() for x in s.statistics)
        resident = [f.detach().cpu().numpy() for f in s.resident]
        scores = diag.fit_scores(t, ata, resident, norm2)
        out["fit"][k, p] = scores.fit
        out["explained_variance"][k, p] = scores.explained_variance
        # one core, both normalizations; nan at ranks above the samples (not identifiable)
        consistency = diag.core_consistencies(t, ata, resident, n_samples=m.shape[0])
        out["corcondia"][k, p] = consistency["bro-kiers"]
        out["corcondia_core_norm"][k, p] = consistency["core-norm"]
        out["degeneracy"][k, p] = diag.degeneracy(m)
    return out


def rank_sweep(
    data: Any,
    ranks: Any,
    replicates: int = 3,
    method: str = "cp",
    *,
    n_iter_max: int = 100,
    tol: float = 1e-8,
    init: str = "random",
    random_state: int = 0,
    sweeps: int = 5,
    chunk_size: int | None = None,
    max_chunk_bytes: int | None = None,
    dtype: Any = None,
    device: str | torch.device = "cpu",
    kernel: str | PassKernel | None = None,
    progress: bool | None = None,
    compress: bool = False,
    compress_dims: int | list[int] | None = None,
    refine_iters: int = 5,
    rank_rule: dict | None = None,
    distributed: bool | None = None,
) -> RankSweep:
    """Fit every (rank, replicate) CP model in shared passes and choose a rank.

    Parameters
    ----------
    data : array, tensor, path or chunk source
        As for :func:`peekcore.cp_als`.
    ranks : sequence of int, int or str
        Candidate ranks (sorted on output): distinct positive integers, or a
        string as ``peek sweep --ranks`` takes it (``"1-8"``, ``"2,4,8"``,
        ``"1-16:2"``). Floats and numeric strings in a list are refused.
    replicates : int
        Random restarts per rank; replicate ``p`` uses seed ``random_state + p``:
        it starts from the same factors as ``cp_als(data, r, random_state=random_state
        + p)`` (``ncp_hals`` for ``method="ncp"``) with the same settings and runs
        the same iteration, but the stacked passes sum in another order, so the
        two agree only up to floating-point rounding, not bit for bit. Rounding
        grows through the iterations (most in float32), and a model whose fit
        change is near ``tol`` can stop some iterations earlier or later than
        the refit. At well-posed ranks (a unique optimum that both reach) the
        refit finds the same model to a tolerance: in tests, float32 data,
        fits within 1e-4 and factor match score above 0.99. Above the data's
        rank, where optima are flat or not unique, the two can end at different
        factors of nearly the same fit.
    method : {"cp", "ncp"}
        CP-ALS or nonnegative CP (HALS, ``sweeps`` inner sweeps).
    n_iter_max, tol : int, float
        Per model, as for :func:`peekcore.cp_als`; a converged model stops
        while the others go on.
    init : {"random", "gram"}
        ``"gram"`` is deterministic, so it needs ``replicates=1``.
    chunk_size, max_chunk_bytes, dtype, device, kernel, progress
        As for :func:`peekcore.cp_als`.
    compress : bool
        Run the sweep on the data projected onto the leading subspaces of its
        resident modes (``method="cp"`` only; the projection and the small sweep
        run in the compute dtype that ``dtype`` and the data set, as an exact
        sweep would), score every model exactly on the
        full data (fit, core consistency, stability and degeneracy of a model
        inside the subspaces follow from the projected data and ``||X||^2``),
        then refine the chosen rank with ``refine_iters`` exact passes.
    compress_dims : int or list of int, optional
        Subspace size per resident mode (default ``min(I_m, max(ranks) + 8)``).
    refine_iters : int
        Exact passes for the chosen rank after a compressed sweep.
    rank_rule : dict, optional
        Keyword arguments for :func:`peekcore.diagnostics.choose_rank` (``rule``,
        ``threshold``, ``stability_threshold``, ...).
    distributed : bool, optional
        Data-parallel over the sample mode, as for :func:`peekcore.cp_als`
        (exact sweeps only).

    Returns
    -------
    RankSweep
    """
    t_start = time.perf_counter()
    random_state = check_random_state(random_state)
    if random_state is None:
        raise InvalidTypeError(
            "rank_sweep needs an integer random_state: replicate p uses seed random_state + p"
        )
    if method not in _METHODS:
        raise InvalidArgumentError(f"method must be 'cp' or 'ncp', got {method!r}")
    replicates = check_int(replicates, "replicates", purpose=" (restarts per rank)")
    refine_iters = check_int(
        refine_iters, "refine_iters", minimum=0, purpose=" (exact passes after a compressed sweep)"
    )
    if init == "gram" and replicates > 1:
        raise InvalidArgumentError(
            "init='gram' is deterministic, so its replicates would be identical: use "
            "init='random' for replicates, or replicates=1"
        )
    if compress and method != "cp":
        raise InvalidArgumentError(
            "compress=True works with method='cp' only: a projected tensor is not "
            "nonnegative, so HALS cannot run on it"
        )
    kw = dict(
        n_iter_max=n_iter_max,
        tol=tol,
        chunk_size=chunk_size,
        max_chunk_bytes=max_chunk_bytes,
        dtype=dtype,
        device=device,
        kernel=kernel,
        sweeps=sweeps,
    )
    problem = prepare(data, method=_METHODS[method], distributed=distributed, **kw)
    if compress and problem.comm.active:
        raise InvalidArgumentError("compress=True runs in one process; use distributed=False")
    ranks = _check_ranks(ranks, problem.shape)
    if compress:
        return _compressed_sweep(
            problem,
            ranks,
            replicates,
            random_state,
            init,
            progress,
            compress_dims,
            refine_iters,
            rank_rule,
            kw,
            t_start,
        )
    fitted = fit_models(
        problem,
        init,
        _specs(ranks, replicates, random_state),
        progress=progress,
        desc=f"rank sweep ({len(ranks) * replicates} models)",
        keep_statistics=True,
    )
    states, norm2 = fitted.states, fitted.norm2
    models = [finish_model(problem, s, fitted.init_name) for s in states]
    return _assemble(
        problem, states, models, ranks, replicates, method, norm2, rank_rule, {}, t_start
    )


def _assemble(
    problem: Problem,
    states: list[ModelState],
    models: list[CPModel],
    ranks: list[int],
    replicates: int,
    method: str,
    norm2: float,
    rank_rule: dict | None,
    compression: dict,
    t_start: float,
) -> RankSweep:
    scores = _score(states, models, ranks, replicates, norm2)
    grid = [models[k * replicates : (k + 1) * replicates] for k in range(len(ranks))]
    best = np.array([int(np.nanargmax(scores["fit"][k])) for k in range(len(ranks))])
    stab = np.full(len(ranks), math.nan)
    reached = np.zeros(len(ranks))
    for k, row in enumerate(grid):
        for m in row:  # compressed and refined models too describe the data given
            m.metadata["source"] = problem.origin
        # replicates that found the best optimum (in fit); stability asks whether they
        # agree on the components (an overfactored rank reaches one fit many ways)
        fits = scores["fit"][k]
        near = np.flatnonzero(fits >= np.nanmax(fits) - STABILITY_FIT_TOL)
        reached[k] = len(near) / replicates
        if len(near) > 1:
            stab[k] = diag.stability([row[i] for i in near], fits=fits[near])
    idx = np.arange(len(ranks))
    choice = diag.choose_rank(
        ranks,
        scores["corcondia"][idx, best],
        scores["fit"][idx, best],
        stab if replicates > 1 else None,
        **(rank_rule or {}),
    )
    return RankSweep(
        ranks=ranks,
        replicates=replicates,
        method=method,
        models=grid,
        best=best,
        stability=stab,
        reached_best=reached,
        chosen_rank=int(choice.rank),
        choice_reason=choice.reason,
        compression=compression,
        seconds=time.perf_counter() - t_start,
        metadata={
            "shape": list(problem.shape),
            "dtype": problem.stored,
            "kernel": problem.kernel.name,
            "device": str(problem.device),
            "rule": choice.rule,
            "high_quality_ranks": list(choice.high_quality),
            "peekcore_version": __version__,
            "source": problem.origin,
        },
        **scores,
    )


# ------------------------------------------------------------------ compressed


def _project(problem: Problem, bases: list[torch.Tensor]) -> torch.Tensor:
    """One pass: ``Y = X x_1 U_1^T x_2 U_2^T ...`` (``N x k_1 x ... x k_d``, compute dtype)."""
    shape = problem.shape
    compute = problem.settings.compute_dtype
    out = torch.empty(
        (shape[0], *[u.shape[1] for u in bases]), dtype=compute, device=problem.device
    )
    for offset, chunk in iterate_chunks(problem.source, problem.settings.chunk_size):
        y = chunk.to(device=problem.device, dtype=compute)
        for m, u in enumerate(bases):  # contract resident mode m (axis m + 1) with U_m
            y = torch.movedim(torch.tensordot(y, u.to(y.dtype), dims=([m + 1], [0])), -1, m + 1)
        out[offset : offset + chunk.shape[0]] = y
    return out


def _lifted_history(history: FitHistory, norm2: float, norm2_y: float) -> FitHistory:
    """A compressed fit's history in terms of the full data (see ``_compressed_sweep``)."""
    rel = [
        math.sqrt(max(norm2 - norm2_y + e * e * norm2_y, 0.0) / norm2) for e in history.rel_error
    ]
    return replace(history, fit=[1.0 - e for e in rel], rel_error=rel)


def _compress_dims(compress_dims: Any, dims: tuple[int, ...], ranks: list[int]) -> list[int]:
    """Subspace size per resident mode (default ``min(I_m, max(ranks) + 8)``), checked."""
    if compress_dims is None:
        compress_dims = [min(n, max(ranks) + 8) for n in dims]
    elif isinstance(compress_dims, int):
        compress_dims = [min(n, compress_dims) for n in dims]
    if len(compress_dims) != len(dims) or any(k < 1 for k in compress_dims):
        raise InvalidArgumentError(f"compress_dims must give one positive size per mode {dims}")
    return list(compress_dims)


def _leading_subspaces(
    problem: Problem, compress_dims: list[int]
) -> tuple[list[torch.Tensor], float]:
    """One streamed Gram pass: the leading ``k_m`` eigenvectors of every resident mode's
    Gram (``I_m x k_m``) and ``||X||^2``."""
    settings = problem.settings
    grams, norm2 = gram_pass(
        problem.source, settings.chunk_size, settings.compute_dtype, problem.device
    )
    check_not_all_zeros(norm2)
    bases = []
    for g, k in zip(grams, compress_dims, strict=True):
        vals, vecs = torch.linalg.eigh(g)
        bases.append(vecs[:, torch.argsort(vals, descending=True)[:k]].contiguous())
    return bases, norm2


def _refine(problem: Problem, chosen: CPModel, iterations: int) -> CPModel:
    """``iterations`` exact passes over the full data from a compressed sweep's model.

    The sweep's own problem (source, kernel, chunking, scale), with only the
    iteration limit changed: nothing is checked or planned again.
    """
    longer = replace(problem, settings=replace(problem.settings, n_iter_max=iterations))
    seed = chosen.metadata.get("random_state")  # the replicate's, should a component be reseeded
    fitted = fit_models(longer, chosen, [(chosen.rank, seed)], progress=False)
    return finish_model(longer, fitted.states[0], fitted.init_name)


def _compressed_sweep(
    problem: Problem,
    ranks: list[int],
    replicates: int,
    random_state: int,
    init: str,
    progress: bool | None,
    compress_dims: int | list[int] | None,
    refine_iters: int,
    rank_rule: dict | None,
    kw: dict,
    t_start: float,
) -> RankSweep:
    settings = problem.settings
    dims = problem.shape[1:]
    compress_dims = _compress_dims(compress_dims, dims, ranks)
    # 1. leading subspaces of every resident mode, from one streamed Gram pass
    bases, norm2 = _leading_subspaces(problem, compress_dims)
    # 2. one pass projects the data; 3. the whole sweep on the small tensor
    y = _project(problem, bases)
    norm2_y = float(torch.sum(y.double() ** 2))
    # the small sweep runs in the full problem's compute dtype (dtype=, or float64
    # for float64 data), which is what every model's metadata records
    small_kw = {
        **kw,
        "chunk_size": None,
        "kernel": None,
        "device": problem.device,
        "dtype": settings.compute_dtype,
    }
    small = prepare(ArraySource(y), method=ALS, **small_kw)
    bases = [u.to(problem.device) for u in bases]
    states = fit_models(
        small,
        init,
        _specs(ranks, replicates, random_state),
        norm2=norm2_y,
        progress=progress,
        desc=f"compressed sweep ({len(ranks) * replicates} models)",
        keep_statistics=True,
    ).states
    # 4. every model evaluated on the full data, exactly, from what the two
    # passes measured. The lifted model (B = U_1 B_y, ...) lies in the
    # subspaces, so X - M splits into two orthogonal parts, X - P X and the
    # lifted Y - M_y: ||X - M||^2 = ||X||^2 - ||Y||^2 + ||Y - M_y||^2. Likewise
    # <X, M>, the core-consistency core (B^+ = B_y^+ U_1^T) and the congruences
    # between components equal their values on Y, so the small statistics
    # scored against the full ||X||^2 are the full-data diagnostics.
    lifted = [
        replace(
            s,
            resident=[u @ f.to(u.device) for u, f in zip(bases, s.resident, strict=True)],
            a=s.a.to(device=problem.device, dtype=settings.compute_dtype),
            history=_lifted_history(s.history, norm2, norm2_y),
        )
        for s in states
    ]
    models = [finish_model(problem, s, "compressed") for s in lifted]
    sweep = _assemble(
        problem, states, models, ranks, replicates, "cp", norm2, rank_rule, {}, t_start
    )
    # 5. refine the chosen rank's best replicate with more exact passes
    k = sweep.ranks.index(sweep.chosen_rank)
    b = int(sweep.best[k])
    if refine_iters > 0:
        sweep.models[k][b] = _refine(problem, sweep.models[k][b], refine_iters)
        sweep.fit[k, b] = sweep.models[k][b].fit
    j = k * replicates + b
    sweep.compression = {
        "dims": list(compress_dims),
        "captured_energy": norm2_y / norm2,
        "chosen_fit_compressed": float(models[j].fit),
        "chosen_fit_refined": float(sweep.fit[k, b]),
        "refine_iters": refine_iters,
    }
    sweep.seconds = time.perf_counter() - t_start
    return sweep
