"""TensorLy drop-in: ``parafac`` and ``non_negative_parafac_hals`` on peekcore's streaming engine.

Same signatures, defaults, return types and errors as TensorLy 0.10's
``tensorly.decomposition.parafac`` / ``non_negative_parafac_hals`` and its
``CP`` / ``CP_NN_HALS`` classes, so that ``from peekcore.tensorly import
parafac`` replaces ``from tensorly.decomposition import parafac``. The fit
itself is :func:`peekcore.cp_als` / :func:`peekcore.ncp_hals`'s: one streamed
pass over the tensor per iteration, mode 0 the streamed mode. Tensors of any
TensorLy backend come in; factors come back in the same backend and dtype.

What differs from TensorLy (see README, "TensorLy drop-in"):

* ``init="svd"``: the resident modes (1, 2, ...) start at the leading left
  singular vectors of their unfoldings, as TensorLy's, but computed from the
  mode Grams of one streamed pass (any ``svd`` of ``tensorly.SVD_FUNS``
  gives the same subspace); mode 0 starts at zero, and the first iteration
  solves it from the others (ALS's first update of mode 0 does not read it).
  Non-negative fits start at the positive parts (TensorLy: NNDSVD).
* ``normalize_factors=True`` returns normalized factors also when the fit
  stopped early (TensorLy skips the last normalization then).
* Errors are Python floats; a residual that rounding makes negative counts
  as 0 (TensorLy takes its absolute value).
* Not supported, refused with ``NotImplementedError`` naming the option:
  ``orthogonalise``, ``linesearch``, ``sparsity``, ``l2_reg``, ``mask``,
  complex data, order < 3, and for HALS ``sparsity_coefficients``,
  ``nn_modes`` other than all modes, ``exact=True``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import (
    InvalidArgumentError,
    InvalidTypeError,
    MissingDependencyError,
    UnsupportedOptionError,
)

try:
    import tensorly as tl
    import tensorly.decomposition as tl_decomposition
    from tensorly.cp_tensor import CPTensor, validate_cp_rank
    from tensorly.decomposition._cp import initialize_cp
    from tensorly.tenalg.svd import SVD_FUNS
except ImportError as err:  # pragma: no cover - tensorly is a test dependency
    raise MissingDependencyError(
        "peekcore.tensorly is a drop-in for TensorLy's CP functions and needs TensorLy: "
        "pip install tensorly"
    ) from err

from .kernels import ALS, HALS
from .model import CPModel
from .solvers.checks import check_rank
from .solvers.engine import run_models
from .solvers.iteration import residual
from .solvers.problem import new_state, prepare

__all__ = ["parafac", "non_negative_parafac_hals", "CP", "CP_NN_HALS"]

_CRITERIA = ("abs_rec_error", "rec_error")


def _refuse(option: str, why: str) -> None:
    raise UnsupportedOptionError(
        f"peekcore.tensorly does not support {option} ({why}); use "
        f"tensorly.decomposition for it, or drop the option"
    )


def _as_numpy(tensor: Any) -> np.ndarray:
    """The tensor as a float numpy array: a view of numpy arrays (memmaps stay
    memmaps, streamed from disk) and CPU torch tensors, else ``tl.to_numpy``
    (whose numpy backend would copy the whole tensor)."""
    if isinstance(tensor, np.ndarray):
        arr = tensor
    elif isinstance(tensor, torch.Tensor):
        arr = tensor.detach().cpu().numpy()
    else:
        arr = tl.to_numpy(tensor)
    if np.iscomplexobj(arr):
        _refuse("complex data", "the streaming engine fits real tensors")
    if arr.ndim < 3:
        _refuse(
            f"tensors of order {arr.ndim}",
            "the engine streams mode 0 and keeps at least two other modes",
        )
    if arr.dtype not in (np.float16, np.float32, np.float64):
        arr = arr.astype(np.float64)
    return arr


def _fixed_list(fixed_modes: Any, ndim: int, drop_last: bool) -> list[int]:
    fixed = [] if fixed_modes is None else [int(m) for m in fixed_modes]
    if drop_last and ndim - 1 in fixed:
        import warnings

        warnings.warn(
            "You asked for fixing the last mode, which is not supported.\n The last mode will "
            "not be fixed. Consider using tl.moveaxis()",
            stacklevel=3,
        )
        fixed.remove(ndim - 1)
    return fixed


@dataclasses.dataclass(frozen=True)
class _Start:
    """TensorLy's initialization arguments (``normalize_factors`` too: its
    ``initialize_cp`` reads it), ``svd`` checked as TensorLy checks it."""

    init: Any
    svd: Any
    random_state: Any
    normalize_factors: bool

    def __post_init__(self) -> None:
        if not (self.svd in SVD_FUNS or callable(self.svd)):
            raise InvalidArgumentError(
                f"Got svd={self.svd}. However, the possible choices are {SVD_FUNS}"
            )

    def model(
        self, tensor: Any, rank: int, non_negative: bool
    ) -> tuple[Any, int | None, CPTensor | None]:
        """The engine's ``init``, a seed, and the initial CPTensor when there is one.

        ``"random"`` and CPTensor inits are TensorLy's own ``initialize_cp`` (it
        reads only the tensor's shape and context), so the iterations start where
        TensorLy's would; ``"svd"`` is the engine's streamed Gram init.
        """
        rng = tl.check_random_state(self.random_state)
        if isinstance(self.init, str) and self.init == "svd":
            return "gram", int(rng.randint(0, 2**31 - 1)), None
        kt = initialize_cp(
            tensor,
            rank,
            init=self.init,
            svd=self.svd,
            non_negative=non_negative,
            random_state=rng,
            normalize_factors=self.normalize_factors,
        )
        weights, factors = kt
        mats = [np.asarray(tl.to_numpy(f), dtype=np.float64) for f in factors]
        if weights is not None:
            w = np.asarray(tl.to_numpy(weights), dtype=np.float64)
            if not np.all(w == 1):  # into the last factor, which is never fixed (TensorLy's rule)
                mats[-1] = mats[-1] * w
        if np.iscomplexobj(mats[0]):
            _refuse("complex data", "the streaming engine fits real tensors")
        return CPModel(np.ones(rank), mats), None, CPTensor((weights, factors))


@dataclasses.dataclass(frozen=True)
class _Stopping:
    """TensorLy's stopping rule on the reconstruction errors, its ``verbose``
    prints, and the user's ``callback``; the values checked as TensorLy checks them."""

    n_iter_max: int
    tol: Any
    cvg_criterion: str
    verbose: Any
    callback: Callable[[CPTensor, float], Any] | None = None

    def __post_init__(self) -> None:
        if self.cvg_criterion not in _CRITERIA:
            raise InvalidTypeError(
                f"Unknown convergence criterion {self.cvg_criterion!r}: one of {_CRITERIA}"
            )
        tol = self.tol
        if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
            raise InvalidArgumentError(f"tol must be a nonnegative number or None, got {tol!r}")

    def __call__(self, errors: list[float], current: Callable[[], CPTensor]) -> bool:
        """Whether to stop after the iteration whose relative error is ``errors[-1]``;
        ``current()`` builds the model for the callback."""
        if self.callback is not None and self.callback(current(), errors[-1]) is True:
            if self.verbose:
                print("Received True from callback function. Exiting.")
            return True
        if self.tol and len(errors) >= 2:
            decrease = errors[-2] - errors[-1]
            if self.verbose:
                print(
                    f"iteration {len(errors) - 1}, reconstruction error: {errors[-1]}, "
                    f"decrease = {decrease}"
                )
            absolute = self.cvg_criterion == "abs_rec_error"
            stop = abs(decrease) < self.tol if absolute else decrease < self.tol
            if stop and self.verbose:
                print(f"PARAFAC converged after {len(errors) - 1} iterations")
            return bool(stop)
        if self.verbose:
            print(f"reconstruction error={errors[-1]}")
        return False


def _to_cp(
    mats: list[np.ndarray], like: Any, dtype: np.dtype, normalize: bool, rank: int
) -> CPTensor:
    """Factors (float64 numpy) as a CPTensor in ``like``'s backend, device and ``dtype``."""
    ctx = tl.context(like)
    factors = [tl.tensor(np.ascontiguousarray(m, dtype=dtype), **ctx) for m in mats]
    cp = CPTensor((tl.ones(rank, **ctx), factors))
    return tl.cp_normalize(cp) if normalize else cp


def _fit(
    tensor: Any, rank: Any, method: str, start: _Start, stopping: _Stopping, fixed_modes: Any
) -> tuple[CPTensor, list[float]]:
    """The common body of both drop-ins: a streamed fit with TensorLy's stopping rule.

    Returns the CPTensor (in ``tensor``'s backend and dtype) and the relative
    reconstruction errors, one per iteration.
    """
    arr = _as_numpy(tensor)
    rank = validate_cp_rank(arr.shape, rank=rank)
    nonneg = method == HALS
    engine_init, seed, given = start.model(tensor, rank, nonneg)
    fixed = _fixed_list(fixed_modes, arr.ndim, drop_last=method == ALS)
    if given is None and 0 in fixed:
        _refuse(
            "fixed_modes holding 0 with init='svd'", "the sample mode's SVD factor is not formed"
        )
    if len(fixed) == arr.ndim or stopping.n_iter_max < 1:  # nothing to fit: the initial model
        if given is None:
            _refuse("init='svd' without iterations", "the sample mode's SVD factor is not formed")
        return (tl.cp_normalize(given) if start.normalize_factors else given), []
    problem = prepare(
        arr,
        method=method,
        n_iter_max=int(stopping.n_iter_max),
        tol=0.0,  # TensorLy's own rule on the errors: ``stopping``
        chunk_size=None,
        max_chunk_bytes=None,
        dtype=None,
        device="cpu",
        kernel=None,
        sweeps=5,  # TensorLy's HALS runs up to 5 inner sweeps
        checkpoint=None,
        checkpoint_every=1,
        fixed_modes=fixed,
    )
    rank = check_rank(rank, problem.shape)

    if engine_init == "gram" and nonneg:
        # TensorLy makes its SVD start feasible by absolute values; so does this one (the
        # engine's positive parts stalled TensorLy's own test case at an error of 0.11)
        a0, resident = problem.initializer("gram", nonneg=False).factors(rank, seed)
        mats = [a0.cpu().numpy()] + [torch.abs(f).cpu().numpy() for f in resident]
        engine_init = CPModel(np.ones(rank), mats)
    initializer = problem.initializer(engine_init, nonneg=nonneg)
    state = new_state(initializer, rank, seed, problem.settings.compute_dtype, problem.comm)
    norm2 = initializer.norm2  # None: the first pass measures it and vets the data

    def current(a: torch.Tensor) -> CPTensor:
        # the engine reads data far from 1 rescaled (peekcore.solvers.scaling): undone here
        mats = [a.to(torch.float64).cpu().numpy() / problem.scale]
        mats += [f.cpu().numpy() for f in state.resident]
        return _to_cp(mats, tensor, arr.dtype, start.normalize_factors, rank)

    if stopping.callback is not None:  # TensorLy calls it on the initial model too
        resid2, norm2 = residual(problem, state.a, state.resident, norm2)
        stopping.callback(current(state.a), float(np.sqrt(abs(resid2) / norm2)))
    errors: list[float] = []

    def on_iteration(info: Any) -> bool:
        errors.append(info.rel_error)
        return stopping(errors, lambda: current(state.a))

    run_models(problem, [state], norm2=norm2, callback=on_iteration, progress=False)
    return current(problem.comm.gather_rows(state.a)), errors


def parafac(
    tensor,
    rank,
    n_iter_max=100,
    init="svd",
    svd="truncated_svd",
    normalize_factors=False,
    orthogonalise=False,
    tol=1e-8,
    random_state=None,
    verbose=0,
    return_errors=False,
    sparsity=None,
    l2_reg=0,
    mask=None,
    cvg_criterion="abs_rec_error",
    fixed_modes=None,
    svd_mask_repeats=5,
    linesearch=False,
    callback=None,
):
    """CP decomposition by ALS, TensorLy's ``parafac`` on peekcore's streaming engine.

    Parameters
    ----------
    tensor : tensor of any TensorLy backend
        Real, order >= 3; mode 0 is streamed (put the largest mode first).
    rank : int
        Number of components (``validate_cp_rank`` values too).
    n_iter_max : int
        Maximum number of iterations (each one pass over the tensor).
    init : {"svd", "random"} or CPTensor
        See the module docstring for ``"svd"``; ``"random"`` and a CPTensor
        start exactly where TensorLy starts.
    svd : str
        One of ``tensorly.SVD_FUNS`` (checked; the subspace is the same).
    normalize_factors : bool
        Return unit-norm factors and their norms as weights.
    orthogonalise : False
        Not supported.
    tol : float
        Stop when the reconstruction error changes by less than ``tol``
        between iterations (``cvg_criterion``); ``0`` or ``None``: never.
    random_state : None, int or numpy.random.RandomState
    verbose : int
        Print the errors as TensorLy does.
    return_errors : bool
        Also return the list of relative reconstruction errors, one per iteration.
    sparsity, l2_reg, mask, linesearch :
        Not supported (``NotImplementedError``); ``svd_mask_repeats`` is used
        only with ``mask``.
    cvg_criterion : {"abs_rec_error", "rec_error"}
    fixed_modes : list of int, optional
        Modes left at their initial values; fixing the last mode warns and is
        ignored, as in TensorLy.
    callback : callable, optional
        ``callback(cp_tensor, rec_error)`` on the initial model and after each
        iteration; returning ``True`` stops.

    Returns
    -------
    CPTensor or (CPTensor, list of float)
        Weights all ones unless ``normalize_factors``; factors ``I_m x rank``.
    """
    if orthogonalise:
        _refuse("orthogonalise", "factors are not orthogonalised between iterations")
    if linesearch:
        _refuse("linesearch", "each iteration is one pass; no extrapolation between them")
    if sparsity:
        _refuse("sparsity", "a sparse component needs the whole residual tensor each iteration")
    if l2_reg:
        _refuse("l2_reg", "the ALS solves are not regularised")
    if mask is not None:
        _refuse("mask", "missing values would need the masked tensor rewritten each iteration")
    start = _Start(init, svd, random_state, normalize_factors)
    stopping = _Stopping(n_iter_max, tol, cvg_criterion, verbose, callback)
    cp, errors = _fit(tensor, rank, ALS, start, stopping, fixed_modes)
    return (cp, errors) if return_errors else cp


def non_negative_parafac_hals(
    tensor,
    rank,
    n_iter_max=100,
    init="svd",
    svd="truncated_svd",
    tol=10e-8,
    random_state=None,
    sparsity_coefficients=None,
    fixed_modes=None,
    nn_modes="all",
    exact=False,
    normalize_factors=False,
    verbose=False,
    return_errors=False,
    cvg_criterion="abs_rec_error",
):
    """Nonnegative CP by HALS, TensorLy's ``non_negative_parafac_hals`` on peekcore's engine.

    Every factor update runs 5 HALS sweeps (TensorLy: up to 5).

    Parameters
    ----------
    tensor : tensor of any TensorLy backend
        Nonnegative, real, order >= 3; mode 0 is streamed.
    rank, n_iter_max, init, svd, tol, random_state, normalize_factors, verbose, cvg_criterion :
        As for :func:`parafac` (a CPTensor init must be nonnegative).
    sparsity_coefficients : None
        Not supported.
    fixed_modes : list of int, optional
        Modes left at their initial values (any mode, the last too).
    nn_modes : "all"
        Only all modes nonnegative is supported.
    exact : False
        Not supported.
    return_errors : bool
        Also return the list of relative reconstruction errors.

    Returns
    -------
    CPTensor or (CPTensor, list of float)
    """
    n_modes = tl.ndim(tensor)
    coefs = (
        sparsity_coefficients
        if isinstance(sparsity_coefficients, (list, tuple))
        else [sparsity_coefficients]
    )
    if any(c is not None for c in coefs):
        _refuse("sparsity_coefficients", "the HALS updates carry no l1 penalty")
    if not (nn_modes == "all" or (nn_modes is not None and set(nn_modes) == set(range(n_modes)))):
        _refuse(f"nn_modes={nn_modes!r}", "every mode of a nonnegative fit is nonnegative")
    if exact:
        _refuse("exact=True", "each factor update runs a fixed 5 HALS sweeps")
    start = _Start(init, svd, random_state, normalize_factors)
    stopping = _Stopping(n_iter_max, tol, cvg_criterion, verbose)
    cp, errors = _fit(tensor, rank, HALS, start, stopping, fixed_modes)
    return (cp, errors) if return_errors else cp


class _RunsOnPeekcore:
    """What peekcore changes in TensorLy's estimator classes: ``fit_transform``.

    The classes below subclass TensorLy's own ``CP`` / ``CP_NN_HALS``, so their
    constructors (signature, defaults, attributes) and ``repr`` are TensorLy's
    by construction. TensorLy's constructors keep each argument as an attribute
    of the same name; :meth:`_decompose` passes them all to the drop-in function.
    """

    def _decompose(self, function: Callable[..., Any], tensor: Any) -> CPTensor:
        """Fit by ``function`` with the kept arguments; keep and return the CPTensor."""
        # TensorLy's constructor parameters, less self: the names its attributes have
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        kept = {name: getattr(self, name) for name in names}
        self.decomposition_, self.errors_ = function(tensor, return_errors=True, **kept)
        return self.decomposition_


class CP(_RunsOnPeekcore, tl_decomposition.CP):
    """TensorLy's ``CP`` class on :func:`parafac` (same parameters).

    ``fit_transform(tensor)`` returns the CPTensor; ``decomposition_`` and
    ``errors_`` hold the result after a fit.
    """

    def fit_transform(self, tensor):
        """Decompose ``tensor``; returns the CPTensor."""
        return self._decompose(parafac, tensor)


class CP_NN_HALS(_RunsOnPeekcore, tl_decomposition.CP_NN_HALS):
    """TensorLy's ``CP_NN_HALS`` class on :func:`non_negative_parafac_hals` (same parameters)."""

    def fit_transform(self, tensor):
        """Decompose ``tensor``; returns the nonnegative CPTensor."""
        return self._decompose(non_negative_parafac_hals, tensor)
