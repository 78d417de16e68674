"""Argument checks shared by the solvers: every message says what to change.

The chunk policy lives in ``problem.plan_chunks``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .._validate import check_int, check_seed, dtype_label, dtype_name
from ..errors import DataError, InvalidArgumentError, InvalidTypeError

__all__ = [
    "TORCH_DTYPES",
    "check_rank",
    "check_random_state",
    "check_checkpoint_every",
    "check_shape",
    "check_iterations",
    "check_fixed_modes",
    "compute_dtype_for",
]

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def check_rank(rank: Any, shape: tuple[int, ...]) -> int:
    """A positive integer rank that the data can support.

    What bounds the rank is the ``R x R`` system of every mode's update, the
    same for the sample mode and the resident ones: mode ``m`` is updated
    against the Hadamard product of the other modes' Grams (for the resident
    modes one of them is ``A^T A``), which is the Gram of their Khatri-Rao
    product, a matrix of ``P_m = prod_{k != m} I_k`` rows. Its rank is at most
    ``P_m``, so with ``R > P_m`` it is singular for any factors: the update is
    underdetermined (ALS would solve a singular system: a pseudo-inverse on the
    CPU, a 1e-12 ridge that amplifies rounding on a GPU). Such a rank also asks
    for nothing a tensor of this shape can need: its mode-``m`` unfolding is
    already an exact decomposition with ``P_m`` components. The binding mode is
    the largest one (``P_m`` is smallest there). Below the bound, ``R`` above
    a mode's own size (the sample count ``N`` included) is fine: the Hadamard
    product is the Gram of a Khatri-Rao product with at least ``R`` rows, of
    full column rank for generic factors even when every Gram in it is rank
    deficient (the fit then matches a dense float64 ALS, tests/test_cp_als.py).
    """
    rank = check_int(rank, "rank", purpose=" (a number of components)")
    mode = max(range(len(shape)), key=lambda k: shape[k])
    others = [n for k, n in enumerate(shape) if k != mode]
    limit = math.prod(others)
    if rank > limit:
        what = "the samples, " if mode == 0 else ""
        raise InvalidArgumentError(
            f"rank {rank} is too high for shape {shape}: the update of mode {mode} ({what}"
            f"size {shape[mode]}) solves an R x R system, the Hadamard product of the other "
            f"modes' Grams ({' x '.join(map(str, others))} = {limit} rows of their Khatri-Rao "
            f"product), whose rank is at most {limit}; at rank {rank} it is singular and the "
            f"update underdetermined (and {limit} components already reproduce the data "
            f"exactly); choose rank <= {limit}"
        )
    return rank


def check_fixed_modes(fixed_modes: Any, ndim: int) -> tuple[int, ...]:
    """Modes whose factors a fit leaves at their initial values, sorted (mode 0 the samples).

    ``None`` or an iterable of distinct integers in ``0 .. ndim - 1``, not all of them.
    """
    if fixed_modes is None:
        return ()
    try:
        modes = list(fixed_modes)
    except TypeError:
        raise InvalidTypeError(
            f"fixed_modes must be None or a list of mode numbers, got {fixed_modes!r}"
        ) from None
    for m in modes:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 0 <= m < ndim:
            raise InvalidArgumentError(
                f"fixed_modes holds {m!r}, which is not a mode of this {ndim}-way data "
                f"(modes 0 .. {ndim - 1}, 0 the samples)"
            )
    if len(set(modes)) != len(modes):
        raise InvalidArgumentError(f"fixed_modes lists a mode twice: {modes}")
    if len(modes) == ndim:
        raise InvalidArgumentError(
            f"fixed_modes={modes} fixes every mode: there is nothing to fit (use the initial "
            "model as it is)"
        )
    return tuple(sorted(int(m) for m in modes))


def check_random_state(random_state: Any) -> int | None:
    """``None`` or a nonnegative integer seed (numpy integers too), as a plain ``int``.

    A seed, not a generator: it is stored in the model's metadata and in
    checkpoints, and HALS re-seeding derives its generators from it.
    """
    return check_seed(random_state, "random_state")


def check_checkpoint_every(checkpoint_every: Any) -> int:
    """A positive integer number of iterations between checkpoints."""
    return check_int(
        checkpoint_every, "checkpoint_every", purpose=" (iterations between checkpoints)"
    )


def check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The data's shape, refused when it has no sample mode and two other modes."""
    if len(shape) < 3:
        raise InvalidArgumentError(
            f"peekcore factors tensors with a sample mode and at least two other modes "
            f"(order >= 3); got shape {shape} (order {len(shape)}). A matrix has no unique "
            "CP decomposition (that is PCA / NMF): keep channels and space (or tokens) as "
            "separate modes, e.g. N x C x (H*W)."
        )
    if shape[0] == 0:
        raise DataError(f"the sample mode is empty (shape {shape}): there is nothing to fit")
    if any(n == 0 for n in shape[1:]):
        raise DataError(f"shape {shape} has an empty mode: there is nothing to fit")
    return shape


def check_iterations(n_iter_max: Any, tol: Any, sweeps: Any) -> tuple[int, float, int]:
    """Validated ``n_iter_max``, ``tol`` and HALS ``sweeps``."""
    n_iter_max = check_int(n_iter_max, "n_iter_max", purpose=" (passes over the data)")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise InvalidArgumentError(f"tol must be a nonnegative number, got {tol!r}")
    sweeps = check_int(sweeps, "sweeps", purpose=" (HALS inner sweeps per pass)")
    return n_iter_max, float(tol), sweeps


def compute_dtype_for(stored: str, dtype: Any) -> torch.dtype:
    """Accumulation dtype: float64 for float64 data, else float32, unless asked."""
    if dtype is None:
        return torch.float64 if stored == "float64" else torch.float32
    try:
        compute = TORCH_DTYPES[dtype_name(dtype)]
    except TypeError:
        raise InvalidArgumentError(
            f"dtype= sets the accumulation precision, not the data's type: 'float32' or "
            f"'float64', or None (float64 for float64 data, else float32); got "
            f"{dtype_label(dtype)!r}. To fit integer data, convert the data itself, e.g. "
            "data.astype(np.float32)"
        ) from None
    if compute not in (torch.float32, torch.float64):
        raise InvalidArgumentError(
            f"dtype= sets the accumulation precision and must be 'float32' or 'float64' (or "
            f"None), got {dtype}; half-precision storage is fine, accumulation in half is not"
        )
    return compute
