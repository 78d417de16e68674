"""What the figures, the report and the exports share: loading results, component scores.

Nothing here draws or writes; it turns result objects (or the files they were
saved to) into plain arrays, and checks the inputs that come with them
(images, labels, spatial shapes) with errors that say how to fix them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import _io
from .._io import atomic_write
from .._validate import check_output_file
from ..errors import DataError, FileFormatError, InvalidArgumentError, InvalidTypeError
from ..model import CPModel
from ..sweep import RankSweep
from ..textout import json_safe

__all__ = [
    "check_component",
    "check_labels",
    "class_purity",
    "component_scores",
    "is_nonnegative",
    "json_safe",
    "label_names",
    "load_model",
    "load_result",
    "load_sweep",
    "open_npz",
    "spatial_maps",
    "top_samples",
    "write_file",
]

PathLike = str | os.PathLike


def write_file(path: PathLike, write: Any) -> Path:
    """:func:`peekcore._io.atomic_write`, creating the folder if missing.

    A new file gets the permissions a plain ``open`` would give (``0o666`` less
    the umask: reports and figures are meant to be shared); a replaced one keeps
    its own.
    """
    target = check_output_file(path, make_folder=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, write)


#: What :func:`load_result` reads, for error messages.
RESULT_FILES = "a .npz file written by CPModel.save or RankSweep.save"


def open_npz(path: PathLike, accepted: str = RESULT_FILES) -> Any:
    """:func:`peekcore._io.open_npz`, accepting peekcore result files by default."""
    return _io.open_npz(path, accepted)


def _file_format(path: PathLike) -> str:
    with open_npz(path) as data:
        return str(_io.read_header(data, path, RESULT_FILES).get("format", ""))


def load_result(obj: Any) -> CPModel | RankSweep:
    """A ``CPModel`` or ``RankSweep``, from itself or from the file it was saved to.

    Parameters
    ----------
    obj : CPModel, RankSweep or path-like
        A file written by :meth:`CPModel.save` or :meth:`RankSweep.save`.

    Returns
    -------
    CPModel or RankSweep
    """
    if isinstance(obj, CPModel | RankSweep):
        return obj
    if isinstance(obj, str | os.PathLike):
        fmt = _file_format(obj)
        if fmt == "peekcore.CPModel":
            return CPModel.load(obj)
        if fmt == "peekcore.RankSweep":
            return RankSweep.load(obj)
        raise FileFormatError(f"{obj} holds {fmt!r}, not a peekcore CPModel or RankSweep")
    raise InvalidTypeError(
        f"expected a CPModel, a RankSweep or the path of a file they were saved to, "
        f"got {type(obj).__name__}"
    )


def load_saved(obj: Any, cls: type, what: str) -> Any:
    """An instance of ``cls``, from itself or from the ``.npz`` its ``save`` wrote.

    ``what`` names the class in the error (e.g. ``"RankProfile"``).
    """
    if isinstance(obj, cls):
        return obj
    if isinstance(obj, str | os.PathLike):
        return cls.load(obj)
    raise InvalidTypeError(f"give a {what} or the path of its .npz, got {type(obj).__name__}")


def load_model(obj: Any) -> CPModel:
    """A ``CPModel`` from a model, a sweep (its chosen rank's best model) or a file of either."""
    res = load_result(obj)
    return res.model() if isinstance(res, RankSweep) else res


def load_sweep(obj: Any) -> RankSweep:
    """A ``RankSweep`` from itself or from a file written by :meth:`RankSweep.save`."""
    res = load_result(obj)
    if not isinstance(res, RankSweep):
        raise InvalidTypeError(
            "expected a rank sweep (RankSweep or its .npz file), got a single CPModel: "
            "run peekcore.sweep.rank_sweep to get one"
        )
    return res


def check_component(model: CPModel, component: Any) -> int:
    """``component`` as an int in ``0 .. R-1``, or an error naming the valid range."""
    if isinstance(component, bool) or not isinstance(component, int | np.integer):
        raise InvalidTypeError(f"component must be an integer, got {component!r}")
    if not 0 <= int(component) < model.rank:
        raise InvalidArgumentError(
            f"component {component} is out of range for a rank-{model.rank} model: "
            f"use 0..{model.rank - 1}"
        )
    return int(component)


def is_nonnegative(model: CPModel) -> bool:
    """Whether every factor (and weight) of the model is nonnegative."""
    return bool(np.all(model.weights >= 0) and all(np.all(f >= 0) for f in model.factors))


def component_scores(model: CPModel) -> tuple[np.ndarray, bool]:
    """How strongly each sample expresses each component.

    Parameters
    ----------
    model : CPModel

    Returns
    -------
    scores : ndarray
        ``N x R``: the sample factor ``A`` for a nonnegative model, ``|A|`` otherwise.
    signed : bool
        Whether ``|A|`` was taken (the model has negative entries).
    """
    signed = not is_nonnegative(model)
    a = model.factors[0]
    return (np.abs(a) if signed else a.copy()), signed


def top_samples(scores: np.ndarray, component: int, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores of a component, largest first (ties by index)."""
    col = scores[:, component]
    k = max(1, min(int(k), col.shape[0]))
    return np.argsort(-col, kind="stable")[:k]


def spatial_maps(model: CPModel, spatial_shape: Sequence[int] | None = None) -> np.ndarray | None:
    """Each component's spatial map.

    Parameters
    ----------
    model : CPModel
        Order 2 (``N x C``: no space), 3 (``N x C x S``) or 4 (``N x C x H x W``).
    spatial_shape : (int, int), optional
        ``(H, W)`` with ``H * W = S`` for a 3-way model (default
        ``metadata["spatial_shape"]``, else a square ``S``). For a 4-way model
        it must equal ``(H, W)`` if given.

    Returns
    -------
    ndarray or None
        ``R x H x W``: ``outer(C[:, r], D[:, r])`` for a 4-way model, ``C[:, r]``
        reshaped row-major for a 3-way model; None for a 2-way model.
    """
    order = len(model.factors)
    if order == 2:
        return None
    if order == 4:
        c, d = model.factors[2], model.factors[3]
        shape = (c.shape[0], d.shape[0])
        if spatial_shape is not None and tuple(int(s) for s in spatial_shape) != shape:
            raise InvalidArgumentError(
                f"spatial_shape {tuple(spatial_shape)} does not match the 4-way model's "
                f"spatial modes {shape}: leave spatial_shape out for a 4-way model"
            )
        return np.einsum("hr,wr->rhw", c, d)
    if order != 3:
        raise InvalidArgumentError(
            f"spatial maps need a model of order 2, 3 or 4 (samples x channels [x space]), "
            f"got order {order} (shape {model.shape})"
        )
    c = model.factors[2]
    s = c.shape[0]
    if spatial_shape is None:
        spatial_shape = model.metadata.get("spatial_shape")
    if spatial_shape is None:
        side = math.isqrt(s)
        if side * side != s:
            raise InvalidArgumentError(
                f"the spatial mode has {s} entries, which is not a square: pass "
                f"spatial_shape=(H, W) with H * W = {s}"
            )
        spatial_shape = (side, side)
    h, w = (int(v) for v in spatial_shape)
    if h * w != s:
        raise InvalidArgumentError(
            f"spatial_shape {(h, w)} has {h * w} entries but the spatial mode has {s}: "
            f"pass (H, W) with H * W = {s}, in the order the activations were flattened"
        )
    return c.T.reshape(-1, h, w).copy()


def check_labels(labels: Any, n: int, what: str = "labels") -> np.ndarray:
    """Labels as a 1-D array of length ``n`` with no missing entries."""
    if labels is None:
        raise InvalidArgumentError(
            f"{what} are required: pass one class label per sample (length {n}), in the "
            "order the activations were captured"
        )
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InvalidArgumentError(
            f"{what} has shape {arr.shape} but the model has {n} samples: pass one label "
            f"per sample, shape ({n},)"
        )
    missing = np.zeros(n, dtype=bool)
    if arr.dtype.kind == "O":
        for i, v in enumerate(arr):
            missing[i] = v is None or (isinstance(v, float) and math.isnan(v)) or v == ""
    elif arr.dtype.kind == "f":
        missing = np.isnan(arr)
    elif arr.dtype.kind == "U":
        missing = arr == ""
    if missing.any():
        where = np.flatnonzero(missing)
        raise DataError(
            f"{what} has {where.size} missing entries (None, NaN or empty), e.g. at samples "
            f"{where[:5].tolist()}: give every sample a class, or drop those samples from "
            "the data before fitting"
        )
    if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    return arr


def label_names(classes: np.ndarray, class_names: Any = None) -> list[str]:
    """Display names of classes: ``class_names[c]`` (a sequence or mapping), else ``str(c)``."""
    if class_names is None:
        return [str(c) for c in classes.tolist()]
    out = []
    for c in classes.tolist():
        if isinstance(class_names, Mapping):
            name = class_names.get(c, class_names.get(str(c)))
            if name is None:
                raise InvalidArgumentError(f"class {c!r} has no entry in class_names: add it")
        else:
            if not isinstance(c, int) or not 0 <= c < len(class_names):
                raise InvalidArgumentError(
                    f"class {c!r} has no name in class_names ({len(class_names)} names, "
                    "indexed by integer label): give a mapping for other labels"
                )
            name = class_names[c]
        out.append(str(name))
    return out


def class_purity(
    scores: np.ndarray, labels: np.ndarray, top_k: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Per-class mean scores and the class purity of each component.

    Parameters
    ----------
    scores : ndarray
        ``N x R`` component scores (:func:`component_scores`).
    labels : ndarray
        ``N`` class labels.
    top_k : int, optional
        Samples per component for the purity (default the mean class size, so a
        component that picks out exactly one class has purity 1).

    Returns
    -------
    classes : ndarray
        ``K`` sorted distinct labels.
    means : ndarray
        ``K x R`` mean score of each class's samples.
    purity : ndarray
        ``R`` share of each component's ``top_k`` samples in its dominant class.
    dominant : ndarray
        ``R`` index into ``classes`` of each component's dominant class.
    top_k : int
        The ``k`` used.
    """
    classes, inverse = np.unique(labels, return_inverse=True)
    n, rank = scores.shape
    counts = np.bincount(inverse, minlength=classes.size)
    means = np.zeros((classes.size, rank))
    np.add.at(means, inverse, scores)
    means /= counts[:, None]
    if top_k is None:
        top_k = max(1, round(n / classes.size))
    top_k = max(1, min(int(top_k), n))
    purity = np.zeros(rank)
    dominant = np.zeros(rank, dtype=np.int64)
    for r in range(rank):
        hits = np.bincount(inverse[top_samples(scores, r, top_k)], minlength=classes.size)
        dominant[r] = int(np.argmax(hits))
        purity[r] = hits[dominant[r]] / top_k
    return classes, means, purity, dominant, top_k
