"""Exports for other tools: plain npz, xarray Dataset (zarr or netCDF), TensorLy, JSON summary.

The factor matrices are named by letter as in the paper and shared/DESIGN.md:
``A`` (samples x R), ``B`` (channels x R), ``C`` and ``D`` (height x R, width x R)
for a 4-way model, or ``C`` (space x R) for a 3-way one.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import (
    FileFormatError,
    InvalidArgumentError,
    MissingDependencyError,
    OutputExistsError,
)
from ..model import CPModel, FitHistory
from ..sweep import RankSweep
from ._common import (
    check_labels,
    class_purity,
    component_scores,
    json_safe,
    label_names,
    load_model,
    load_result,
    open_npz,
    spatial_maps,
    top_samples,
    write_file,
)

__all__ = [
    "DEFAULT_DIMS",
    "from_npz",
    "load_xarray",
    "save_xarray",
    "summary_json",
    "to_npz",
    "to_tensorly",
    "to_xarray",
]

#: Dimension names by model order.
DEFAULT_DIMS = {
    2: ("sample", "channel"),
    3: ("sample", "channel", "space"),
    4: ("sample", "channel", "y", "x"),
}
_LETTERS = string.ascii_uppercase
_NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf")


def _dims(model: CPModel, dims: Sequence[str] | None) -> tuple[str, ...]:
    order = len(model.factors)
    if dims is None:
        if order not in DEFAULT_DIMS:
            raise InvalidArgumentError(f"give dims: one name per mode of the order-{order} model")
        return DEFAULT_DIMS[order]
    dims = tuple(str(d) for d in dims)
    if len(dims) != order:
        raise InvalidArgumentError(
            f"dims {dims} name {len(dims)} modes but the model has {order} "
            f"(shape {model.shape}): give one name per mode, e.g. {DEFAULT_DIMS.get(order)}"
        )
    if len(set(dims)) != order or "component" in dims:
        raise InvalidArgumentError(f"dims {dims} must be distinct and must not include 'component'")
    return dims


def _sample_ids(sample_ids: Any, n: int) -> np.ndarray | None:
    if sample_ids is None:
        return None
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise InvalidArgumentError(
            f"sample_ids has shape {ids.shape} but the model has {n} samples: give one id "
            f"per sample, shape ({n},)"
        )
    return ids.astype(str) if ids.dtype.kind == "O" else ids


def _header(model: CPModel) -> str:
    return json.dumps(
        json_safe({"history": asdict(model.history), "metadata": model.metadata}), default=str
    )


# ---------------------------------------------------------------------- npz


def to_npz(
    model_or_path: Any,
    path: str | os.PathLike,
    *,
    dims: Sequence[str] | None = None,
    labels: Any = None,
    sample_ids: Any = None,
) -> Path:
    """Write a model as a plain ``.npz`` any numpy can read (no pickles, no peekcore needed).

    Parameters
    ----------
    model_or_path : CPModel, RankSweep or path-like
        A model of shape ``I_0 x ... x I_d`` and rank ``R`` (a sweep gives its chosen model).
    path : path-like
        The ``.npz`` file (written atomically).
    dims : sequence of str, optional
        One name per mode (default by order, see :data:`DEFAULT_DIMS`).
    labels : array-like, optional
        ``N`` class labels.
    sample_ids : array-like, optional
        ``N`` sample identifiers (e.g. file names or dataset indices).

    Returns
    -------
    pathlib.Path

    Notes
    -----
    Arrays: ``weights`` (``R``); ``A``, ``B``, ... (``I_m x R``, one per mode);
    ``dims`` (mode names, in the order of the letters); ``fit_history``
    (per iteration); ``labels`` and ``sample_ids`` when given; ``header``
    (a JSON string with the fit history and metadata). :func:`from_npz` reads it back.
    """
    model = load_model(model_or_path)
    dims = _dims(model, dims)
    n = model.shape[0]
    arrays: dict[str, np.ndarray] = {"weights": model.weights, "dims": np.array(dims)}
    for letter, f in zip(_LETTERS, model.factors, strict=False):
        arrays[letter] = f
    arrays["fit_history"] = np.asarray(model.history.fit, dtype=np.float64)
    if labels is not None:
        lab = check_labels(labels, n)
        arrays["labels"] = lab.astype(str) if lab.dtype.kind == "O" else lab
    ids = _sample_ids(sample_ids, n)
    if ids is not None:
        arrays["sample_ids"] = ids
    arrays["header"] = np.array(_header(model))
    return write_file(path, lambda fh: np.savez(fh, **arrays))


def from_npz(path: str | os.PathLike) -> tuple[CPModel, dict[str, Any]]:
    """Read a file written by :func:`to_npz`.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    model : CPModel
        Weights, factors, fit history and metadata.
    extras : dict
        ``dims`` (tuple of str), ``labels`` and ``sample_ids`` (ndarray or None).
    """
    with open_npz(path, "a file written by peekcore.report.to_npz") as data:
        if "dims" not in data or "weights" not in data or "header" not in data:
            raise FileFormatError(f"{path} was not written by peekcore.report.to_npz")
        dims = tuple(str(d) for d in data["dims"])
        factors = [data[letter] for letter in _LETTERS[: len(dims)]]
        header = json.loads(str(data["header"]))
        model = CPModel(
            data["weights"], factors, FitHistory(**header["history"]), header["metadata"]
        )
        extras = {
            "dims": dims,
            "labels": data["labels"] if "labels" in data else None,
            "sample_ids": data["sample_ids"] if "sample_ids" in data else None,
        }
    return model, extras


# ---------------------------------------------------------------------- xarray


def _xr():
    try:
        import xarray
    except ImportError as err:  # pragma: no cover - xarray is a dependency
        raise MissingDependencyError("to_xarray() needs xarray: pip install xarray") from err
    return xarray


def to_xarray(
    model: Any,
    dims: Sequence[str] | None = None,
    labels: Any = None,
    sample_ids: Any = None,
    *,
    class_names: Any = None,
    spatial_shape: Sequence[int] | None = None,
):
    """The model as an ``xarray.Dataset`` with named dimensions.

    Parameters
    ----------
    model : CPModel, RankSweep or path-like
        Rank ``R``, shape ``N x C x H x W`` (or ``N x C x S``, ``N x C``).
    dims : sequence of str, optional
        One name per mode; default ``("sample", "channel", "y", "x")`` for a
        4-way model, ``("sample", "channel", "space")`` for 3-way,
        ``("sample", "channel")`` for 2-way.
    labels : array-like, optional
        ``N`` class labels: a ``label`` coordinate on the sample dimension.
    sample_ids : array-like, optional
        ``N`` values for the sample coordinate (default ``0 .. N-1``).
    class_names : sequence or mapping, optional
        With ``labels``: a ``class_name`` coordinate (``class_names[label]``).
    spatial_shape : (int, int), optional
        For a 3-way model: also a variable ``spatial_map`` (``y x x x component``),
        ``C`` reshaped row-major.

    Returns
    -------
    xarray.Dataset
        Dimension ``component`` (``R``) plus one per mode. Variables:
        ``weights`` (component); ``A``, ``B``, ... (mode x component);
        ``fit_history`` (iteration); ``spatial_map`` when asked. Coordinates:
        ``component``, one integer coordinate per mode (the sample one from
        ``sample_ids``), ``label`` / ``class_name`` when given. Attributes:
        ``rank``, ``fit``, ``n_iter``, ``converged`` (0/1), ``stop_reason``,
        ``factor_dims`` (JSON: letter to dimension), ``metadata`` (JSON),
        ``peekcore_version``.
    """
    xr = _xr()
    model = load_model(model)
    dims = _dims(model, dims)
    n, rank = model.shape[0], model.rank
    coords: dict[str, Any] = {"component": np.arange(rank)}
    for d, size in zip(dims, model.shape, strict=True):
        coords[d] = np.arange(size)
    ids = _sample_ids(sample_ids, n)
    if ids is not None:
        coords[dims[0]] = ids
    if labels is not None:
        lab = check_labels(labels, n)
        coords["label"] = (dims[0], lab.astype(str) if lab.dtype.kind == "O" else lab)
        if class_names is not None:
            classes, inverse = np.unique(lab, return_inverse=True)
            names = np.array(label_names(classes, class_names))
            coords["class_name"] = (dims[0], names[inverse])
    variables: dict[str, Any] = {"weights": (("component",), model.weights)}
    letters = {}
    for letter, d, f in zip(_LETTERS, dims, model.factors, strict=False):
        variables[letter] = ((d, "component"), f)
        letters[letter] = d
    variables["fit_history"] = (("iteration",), np.asarray(model.history.fit, dtype=np.float64))
    if spatial_shape is not None:
        if len(model.factors) != 3:
            raise InvalidArgumentError(
                "spatial_shape applies to a 3-way model (N x C x S); a 4-way model already "
                "has y and x modes"
            )
        maps = spatial_maps(model, spatial_shape)
        if "y" in dims or "x" in dims:
            raise InvalidArgumentError(
                "spatial_map needs dimensions y and x; rename the modes of dims"
            )
        variables["spatial_map"] = (("y", "x", "component"), np.moveaxis(maps, 0, -1))
    ds = xr.Dataset(variables, coords=coords)
    ds.attrs = {
        "title": "CP model (peekcore)",
        "rank": rank,
        "fit": float(model.fit),
        "n_iter": model.history.n_iter,
        "converged": int(model.history.converged),
        "stop_reason": model.history.stop_reason,
        "factor_dims": json.dumps(letters),
        "metadata": json.dumps(json_safe(model.metadata), default=str),
        "peekcore_version": __version__,
    }
    for letter, d in letters.items():
        ds[letter].attrs["long_name"] = f"factor matrix of mode {d!r}"
    ds["weights"].attrs["long_name"] = "component weights (factor columns have unit norm)"
    return ds


def save_xarray(ds: Any, path: str | os.PathLike, *, engine: str | None = None) -> Path:
    """Write a Dataset to zarr (``.zarr``) or netCDF (``.nc``), replacing any earlier one.

    Parameters
    ----------
    ds : xarray.Dataset
        E.g. from :func:`to_xarray`.
    path : path-like
        Ends in ``.zarr`` (a zarr store folder, written without consolidated
        metadata) or ``.nc`` / ``.nc4`` / ``.netcdf`` / ``.cdf``.
    engine : str, optional
        netCDF engine (default ``"scipy"``: netCDF3, no extra dependency;
        ``"h5netcdf"`` or ``"netcdf4"`` for netCDF4 if installed).

    Returns
    -------
    pathlib.Path
        The store or file, written beside under a temporary name and then
        renamed, so a failure leaves the earlier one in place.
    """
    dest = Path(path)
    suffix = dest.suffix.lower()
    if suffix != ".zarr" and suffix not in _NETCDF_SUFFIXES:
        raise InvalidArgumentError(
            f"cannot tell the format of {dest}: end the path in .zarr (zarr store) or .nc (netCDF)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".zarr":
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            # fixed-width unicode has no zarr v3 specification yet; variable-length has
            ds = ds.copy()
            for name in list(ds.variables):
                if ds[name].dtype.kind == "U":
                    ds[name] = ds[name].astype(object)
            ds.to_zarr(tmp, mode="w", consolidated=False)
            if dest.exists():
                if not (dest / "zarr.json").exists() and not (dest / ".zgroup").exists():
                    raise OutputExistsError(
                        f"{dest} exists and is not a zarr store; not replacing it"
                    )
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest
    data = ds.to_netcdf(path=None, engine=engine or "scipy")
    return write_file(dest, lambda fh: fh.write(bytes(data)))


def load_xarray(path: str | os.PathLike):
    """Read a Dataset written by :func:`save_xarray` fully into memory.

    Parameters
    ----------
    path : path-like
        A ``.zarr`` store or a netCDF file.

    Returns
    -------
    xarray.Dataset
    """
    xr = _xr()
    path = Path(path)
    if path.suffix.lower() == ".zarr":
        with xr.open_zarr(path, consolidated=False) as ds:
            return ds.load()
    with xr.open_dataset(path) as ds:
        return ds.load()


# ---------------------------------------------------------------------- TensorLy


def to_tensorly(model_or_path: Any):
    """The model as a TensorLy ``CPTensor``.

    Parameters
    ----------
    model_or_path : CPModel, RankSweep or path-like

    Returns
    -------
    tensorly.cp_tensor.CPTensor
        ``(weights (R,), [A (I_0 x R), B (I_1 x R), ...])`` copies;
        ``tensorly.cp_to_tensor`` of it equals ``model.reconstruct()``.
    """
    return load_model(model_or_path).to_tensorly()


# ---------------------------------------------------------------------- JSON


def _model_summary(
    model: CPModel,
    labels: np.ndarray | None,
    class_names: Any,
    top_k: int,
    spatial_shape: Sequence[int] | None,
) -> dict[str, Any]:
    scores, signed = component_scores(model)
    b = model.factors[1]
    try:
        maps = spatial_maps(model, spatial_shape)
    except ValueError:
        maps = None  # e.g. a 3-way model with a non-square spatial mode and no shape
    purity = None
    if labels is not None:
        classes, _, purity, dominant, k_purity = class_purity(scores, labels)
        names = label_names(classes, class_names)
    comps = []
    for r in range(model.rank):
        top = top_samples(scores, r, top_k)
        order_b = np.argsort(-(np.abs(b[:, r]) if signed else b[:, r]), kind="stable")[:top_k]
        comp: dict[str, Any] = {
            "component": r,
            "weight": float(model.weights[r]),
            "top_samples": [int(i) for i in top],
            "top_sample_values": [float(model.factors[0][i, r]) for i in top],
            "top_channels": [int(c) for c in order_b],
            "top_channel_loadings": [float(b[c, r]) for c in order_b],
        }
        if maps is not None:
            m = np.abs(maps[r]) if signed else maps[r]
            comp["spatial_peak_yx"] = [int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape)]
        if purity is not None:
            comp["dominant_class"] = names[dominant[r]]
            comp["purity"] = float(purity[r])
            comp["purity_top_k"] = k_purity
        comps.append(comp)
    h = model.history
    return {
        "shape": list(model.shape),
        "rank": model.rank,
        "fit": model.fit,
        "n_iter": h.n_iter,
        "converged": h.converged,
        "stop_reason": h.stop_reason,
        "signed": signed,
        "weights": model.weights,
        "components": comps,
        "metadata": model.metadata,
    }


def _sweep_summary(sweep: RankSweep) -> dict[str, Any]:
    return {
        "ranks": sweep.ranks,
        "replicates": sweep.replicates,
        "method": sweep.method,
        "chosen_rank": sweep.chosen_rank,
        "choice_reason": sweep.choice_reason,
        "table": sweep.table(),
        "compression": sweep.compression,
        "seconds": sweep.seconds,
        "metadata": sweep.metadata,
    }


def summary_json(
    result: Any,
    path: str | os.PathLike | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    labels: Any = None,
    class_names: Any = None,
    top_k: int = 9,
    spatial_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A JSON summary of one or more layers' results (strict JSON: NaN becomes null).

    Parameters
    ----------
    result : CPModel, RankSweep, path-like, or dict of layer name to any of these
        One result, or one per layer.
    path : path-like, optional
        Also write the summary there (atomically, UTF-8, indented).
    settings : dict, optional
        The run's settings, copied in.
    labels : array-like, optional
        ``N`` class labels: adds each component's dominant class and purity.
    class_names : sequence or mapping, optional
        Display names of the labels.
    top_k : int
        Top samples and channels listed per component.
    spatial_shape : (int, int), optional
        For 3-way models, as in :func:`peekcore.report.figures.component_figure`.

    Returns
    -------
    dict
        ``{"format": "peekcore.summary", "version": 1, "peekcore_version",
        "settings", "layers": {name: {...}}}``; each layer has ``shape``,
        ``rank``, ``fit``, ``n_iter``, ``converged``, ``weights``, ``components``
        (``top_samples``, ``top_channels``, ``spatial_peak_yx``, and with labels
        ``dominant_class`` and ``purity``), ``metadata``, and for a sweep
        ``sweep`` (ranks, chosen rank and reason, the per-rank table). A single
        result is filed under the name ``"layer"`` (or its metadata's ``layer``).
    """
    if isinstance(result, Mapping):
        items = list(result.items())
    else:
        res = load_result(result)
        meta = res.metadata if isinstance(res, CPModel) else res.model().metadata
        items = [(str(meta.get("layer", "layer")), res)]
    layers: dict[str, Any] = {}
    for name, item in items:
        res = load_result(item)
        model = res.model() if isinstance(res, RankSweep) else res
        lab = check_labels(labels, model.shape[0]) if labels is not None else None
        entry = _model_summary(model, lab, class_names, top_k, spatial_shape)
        if isinstance(res, RankSweep):
            entry["sweep"] = _sweep_summary(res)
        layers[str(name)] = entry
    out = json_safe(
        {
            "format": "peekcore.summary",
            "version": 1,
            "peekcore_version": __version__,
            "settings": dict(settings or {}),
            "layers": layers,
        }
    )
    if path is not None:
        text = json.dumps(out, indent=1, allow_nan=False, default=str).encode("utf-8")
        write_file(path, lambda fh: fh.write(text))
    return out
