"""Figures from result files: components, classes x components; the plumbing all figures share.

The rank-sweep figure is in :mod:`.sweep_figure`, the training-quality one in
:mod:`.quality_figure`.

Every function takes a loaded result or the path of its file (``CPModel.save``,
``RankSweep.save``), never live solver state, and writes the same figure as
PNG and SVG beside each other (``<out_stem>.png``, ``<out_stem>.svg``). It
returns a :class:`FigureOutput`: the two paths plus the tables behind the
figure, which :func:`peekcore.report.html.write_report` shows next to it.

Drawing goes through matplotlib's object-oriented API on the Agg canvas
(``matplotlib.figure.Figure``, no pyplot): no window, no global figure
registry, no network, only matplotlib's own fonts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import require
from .._validate import check_int
from ..errors import InvalidArgumentError
from ._common import (
    check_component,
    check_labels,
    class_purity,
    component_scores,
    label_names,
    load_model,
    spatial_maps,
    top_samples,
    write_file,
)

__all__ = [
    "FigureOutput",
    "class_component_figure",
    "component_figure",
    "component_figures",
]

_DPI = 110
_CHOSEN = "#d62728"


@dataclass
class FigureOutput:
    """One figure written as PNG and SVG, and the tables behind it.

    Attributes
    ----------
    kind : str
        ``"rank_sweep"``, ``"component"``, ``"class_component"`` or ``"training_quality"``.
    title : str
    png, svg : pathlib.Path
        The files written.
    tables : dict of str to list of dict
        The numbers drawn, one row per dict (column name to value).
    caption : str
        A sentence on how to read the figure.
    component : int or None
        The component shown (``kind="component"`` only).
    stats : dict
        Scalars worth quoting (chosen rank, correlations, ...).
    """

    kind: str
    title: str
    png: Path
    svg: Path
    tables: dict[str, list[dict]] = field(default_factory=dict)
    caption: str = ""
    component: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- plumbing


def _mpl():
    matplotlib = require("matplotlib", "report", "drawing peekcore.report figures")
    from matplotlib.figure import Figure

    return matplotlib, Figure


def _new_figure(figsize: tuple[float, float]):
    _, figure_cls = _mpl()
    return figure_cls(figsize=figsize, layout="constrained")


def _stem(out_stem: str | os.PathLike) -> Path:
    stem = Path(out_stem)
    if stem.suffix.lower() in (".png", ".svg"):
        stem = stem.with_suffix("")
    if not stem.name:
        raise InvalidArgumentError(
            f"out_stem {out_stem!r} has no file name: give e.g. 'figures/sweep'"
        )
    stem.parent.mkdir(parents=True, exist_ok=True)
    return stem


def _write(fig, out_stem: str | os.PathLike, dpi: int) -> tuple[Path, Path]:
    """Write ``fig`` to ``<stem>.png`` and ``<stem>.svg`` atomically; SVG ids are reproducible."""
    matplotlib, _ = _mpl()
    stem = _stem(out_stem)
    png, svg = Path(f"{stem}.png"), Path(f"{stem}.svg")
    with matplotlib.rc_context({"svg.hashsalt": "peekcore", "svg.fonttype": "path"}):
        write_file(
            png, lambda fh: fig.savefig(fh, format="png", dpi=dpi, metadata={"Software": None})
        )
        fig.set_layout_engine("none")  # keep the layout just computed: the SVG skips it
        write_file(svg, lambda fh: fig.savefig(fh, format="svg", metadata={"Date": None}))
    return png, svg


def _finish(
    fig, out_stem, dpi: int, kind: str, title: str, tables, caption: str, **extra
) -> FigureOutput:
    """Write ``fig`` (see ``_write``) and describe it as a :class:`FigureOutput`.

    ``extra`` holds the output's remaining fields (``component``, ``stats``).
    """
    png, svg = _write(fig, out_stem, dpi)
    return FigureOutput(kind, title, png, svg, tables=tables, caption=caption, **extra)


def _integer_ticks(ax, y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


# ---------------------------------------------------------------------- components


def _image_layout(images: Any, n: int) -> tuple[Any, str, tuple[int, int]]:
    """Check the images' shape; return them, their layout and ``(H, W)`` (nothing is copied)."""
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    shape = tuple(int(s) for s in images.shape)
    dtype = images.dtype  # numpy's, or torch's (no .kind; is_complex instead)
    kind = dtype.kind if isinstance(dtype, np.dtype) else "c" if dtype.is_complex else "f"
    if kind not in "biuf":
        raise InvalidArgumentError(
            f"images have dtype {dtype}: expected real numbers (uint8 0-255, or floats); "
            "pass the real images, e.g. np.abs(images) or images.real"
        )
    if len(shape) == 3:
        layout, hw = "gray", shape[1:3]
    elif len(shape) == 4 and shape[1] in (1, 3, 4):
        layout, hw = "first", shape[2:4]
    elif len(shape) == 4 and shape[3] in (1, 3, 4):
        layout, hw = "last", shape[1:3]
    else:
        raise InvalidArgumentError(
            f"images have shape {shape}: expected N x H x W (grayscale), N x C x H x W or "
            "N x H x W x C with C in 1, 3 or 4"
        )
    if shape[0] != n:
        raise InvalidArgumentError(
            f"images has {shape[0]} samples but the model's sample mode has {n}: pass the "
            "input images of exactly the samples the activations came from, in the same order"
        )
    return images, layout, hw


def _image(images: Any, i: int, layout: str) -> np.ndarray:
    """Sample ``i`` as ``H x W`` or ``H x W x 3`` float in ``[0, 1]``."""
    x = images[int(i)]
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if layout == "first":
        x = np.moveaxis(x, 0, -1)
    if x.ndim == 3:
        x = x[..., 0] if x.shape[-1] == 1 else x[..., :3]
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    x = x.astype(np.float64)
    finite = x[np.isfinite(x)]  # NaN and Inf pixels (drawn blank) leave the scale alone
    if not finite.size:
        return np.full_like(x, np.nan)
    lo, hi = float(finite.min()), float(finite.max())
    x = np.where(np.isfinite(x), x, np.nan)
    if lo >= 0.0 and hi <= 1.0:
        return x
    return (x - lo) / (hi - lo) if hi > lo else np.where(np.isnan(x), np.nan, 0.0)


def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``h x w`` map to ``H x W`` (``align_corners=False``)."""
    if m.shape == tuple(size):
        return m.copy()
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.ascontiguousarray(m), dtype=torch.float64)[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _component_data(
    model: Any,
    images: Any,
    r: int,
    top_k: int,
    labels: Any,
    class_names: Any,
    spatial_shape: Sequence[int] | None,
) -> dict[str, Any]:
    """What a component figure shows, computed before drawing: top samples, map, tables."""
    n = model.shape[0]
    check_int(top_k, "top_k", purpose=" (samples to show)")
    images, layout, img_hw = _image_layout(images, n)
    names = None
    if labels is not None:
        labels = check_labels(labels, n)
        classes = np.unique(labels)
        names = dict(zip(classes.tolist(), label_names(classes, class_names), strict=True))
    scores, signed = component_scores(model)
    top = top_samples(scores, r, top_k)
    maps = spatial_maps(model, spatial_shape)
    a, b = model.factors[0][:, r], model.factors[1][:, r]
    order_b = np.argsort(-(np.abs(b) if signed else b), kind="stable")
    top_rows = []
    for pos, i in enumerate(top):
        row = {"position": pos + 1, "sample": int(i), "A": float(a[i])}
        if names is not None:
            row["label"] = names[labels[i].item()]
        top_rows.append(row)
    tables: dict[str, list[dict]] = {
        "top_samples": top_rows,
        "top_channels": [{"channel": int(c), "loading": float(b[c])} for c in order_b[:10]],
    }
    stats: dict[str, Any] = {"component": r, "weight": float(model.weights[r]), "signed": signed}
    m = None if maps is None else maps[r]
    if m is not None:
        tables["spatial_map"] = [
            {"y": y, **{f"x{x}": float(m[y, x]) for x in range(m.shape[1])}}
            for y in range(m.shape[0])
        ]
        peak = np.unravel_index(int(np.argmax(np.abs(m) if signed else m)), m.shape)
        stats["peak_yx"] = [int(peak[0]), int(peak[1])]
    return {
        "images": images,
        "layout": layout,
        "img_hw": img_hw,
        "names": names,
        "labels": labels,
        "scores": scores[:, r],
        "signed": signed,
        "top": top,
        "map": m,
        "a": a,
        "b": b,
        "order_b": order_b,
        "tables": tables,
        "stats": stats,
    }


def _map_colors(m: np.ndarray, signed: bool) -> tuple[str, float, float]:
    """Colour map and limits of a spatial map: diverging around 0 when signed."""
    if signed:
        vmax = float(np.max(np.abs(m))) or 1.0
        return "RdBu_r", -vmax, vmax
    vmin, vmax = float(np.min(m)), float(np.max(m))
    return "viridis", vmin, (vmax if vmax > vmin else vmin + 1.0)


def _draw_top_samples(panel, d: dict[str, Any], alpha: float) -> None:
    """The top images in grey, the upsampled spatial map over each as contour lines.

    Contours leave the image itself untouched (a colour wash hid 8 x 8 digits);
    ``alpha`` is the opacity of the lines.
    """
    top = d["top"]
    ncols = math.ceil(math.sqrt(len(top)))
    nrows = math.ceil(len(top) / ncols)
    grid = np.atleast_1d(panel.subplots(nrows, ncols, squeeze=False)).ravel()
    heat = None
    if d["map"] is not None:
        cmap, vmin, vmax = _map_colors(d["map"], d["signed"])
        heat = _upsample(d["map"], d["img_hw"])
        levels = np.linspace(vmin, vmax, 6)[1:-1]  # four levels inside the map's range
    for ax, i in zip(grid, top, strict=False):
        img = _image(d["images"], i, d["layout"])
        ax.imshow(
            img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest"
        )
        if heat is not None and np.ptp(heat) > 0:
            ax.contour(
                heat,
                levels=levels,
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                linewidths=1.2,
                alpha=min(1.0, alpha * 2),
            )
        caption = f"#{int(i)}  A={d['a'][i]:.3g}"
        if d["names"] is not None:
            caption += f"\n{d['names'][d['labels'][i].item()]}"
        ax.set_title(caption, fontsize=8)
    for ax in grid:
        ax.set_axis_off()
    what = "|A|" if d["signed"] else "A"
    contours = "; contours: the spatial factor" if heat is not None else ""
    panel.suptitle(f"The {len(top)} samples with the largest {what}{contours}", fontsize=11)


def _draw_factors(panel, d: dict[str, Any]) -> None:
    """The spatial map, the channel loadings and the sorted sample factor."""
    ax_map, ax_b, ax_a = panel.subplots(3, 1, height_ratios=[1.6, 1, 1])
    m, b, signed = d["map"], d["b"], d["signed"]
    if m is not None:
        cmap, vmin, vmax = _map_colors(m, signed)
        im = ax_map.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        panel.colorbar(im, ax=ax_map, shrink=0.9)
        ax_map.set_title(f"Spatial factor ({m.shape[0]} x {m.shape[1]})", fontsize=10)
        ax_map.set_xlabel("x")
        ax_map.set_ylabel("y")
        _integer_ticks(ax_map, y=True)
    else:
        ax_map.text(0.5, 0.5, "no spatial mode", ha="center", va="center", color="0.4")
        ax_map.set_axis_off()
    ax_b.bar(np.arange(b.shape[0]), b, width=1.0, color="C0")
    for c in d["order_b"][:3]:
        ax_b.annotate(
            str(int(c)), (c, b[c]), fontsize=7, ha="center", va="bottom" if b[c] >= 0 else "top"
        )
    ax_b.set_title("Channel loadings B[:, r]", fontsize=10)
    ax_b.set_xlabel("channel")
    ax_b.set_xlim(-0.5, b.shape[0] - 0.5)
    a, top = d["a"], d["top"]
    order_a = np.argsort(-d["scores"], kind="stable")
    ax_a.plot(np.arange(a.shape[0]), a[order_a], color="C2", lw=1)
    ax_a.plot(np.arange(len(top)), a[top], "o", color=_CHOSEN, ms=3, label=f"top {len(top)}")
    ax_a.set_title(f"Sample factor A[:, r], sorted by {'|A|' if signed else 'A'}", fontsize=10)
    ax_a.set_xlabel("samples (sorted)")
    ax_a.legend(fontsize=7)


def component_figure(
    model_or_path: Any,
    images: Any,
    component: int,
    *,
    out_stem: str | os.PathLike,
    spatial_shape: Sequence[int] | None = None,
    top_k: int = 9,
    labels: Any = None,
    class_names: Any = None,
    alpha: float = 0.45,
    title: str | None = None,
    dpi: int = _DPI,
) -> FigureOutput:
    """One component: its top-k images with the spatial factor as contours, and its loadings.

    The top-k samples are the ``k`` largest entries of ``A[:, r]`` for a
    nonnegative model, of ``|A[:, r]|`` otherwise. The spatial map (``outer(C[:, r],
    D[:, r])`` for a 4-way model, ``C[:, r]`` reshaped to ``spatial_shape`` for
    a 3-way one) is upsampled bilinearly to the image size and drawn over each
    grey image as contour lines, so the image stays visible; beside them are
    the map itself, the channel loadings ``B[:, r]`` and the sorted sample factor.

    Parameters
    ----------
    model_or_path : CPModel, RankSweep or path-like
        Shape ``N x C x H x W``, ``N x C x S`` or ``N x C`` (no map); a sweep
        gives its chosen rank's best model.
    images : array-like
        The ``N`` network inputs, in sample order: ``N x H' x W'`` (grayscale),
        ``N x 3 x H' x W'`` or ``N x H' x W' x 3`` (numpy, torch or any array with
        ``shape`` and indexing; only the top-k are read). uint8 is scaled by 1/255;
        floats outside ``[0, 1]`` are stretched per image.
    component : int
        ``0 .. R-1``.
    out_stem : path-like
        Output path without suffix (``.png`` and ``.svg`` are written).
    spatial_shape : (int, int), optional
        ``(H, W)`` of a 3-way model's spatial mode (``S = H * W``, row-major).
    top_k : int
        Images shown (at most ``N``).
    labels : array-like, optional
        ``N`` class labels, shown under the images.
    class_names : sequence or mapping, optional
        Display names of the labels.
    alpha : float
        Opacity of the contour lines is ``min(1, 2 * alpha)``.
    title : str, optional
    dpi : int

    Returns
    -------
    FigureOutput
        Tables ``"top_samples"`` (``k`` rows), ``"top_channels"`` (up to 10 rows)
        and ``"spatial_map"`` (``H`` rows of ``W`` values), ``component`` set.
    """
    model = load_model(model_or_path)
    r = check_component(model, component)
    d = _component_data(model, images, r, top_k, labels, class_names, spatial_shape)
    weight = d["stats"]["weight"]
    title = title or f"Component {r} of {model.rank} (weight {weight:.4g})"
    fig = _new_figure((12.5, 6.4))
    left, right = fig.subfigures(1, 2, width_ratios=[1.2, 1.0])
    _draw_top_samples(left, d, alpha)
    _draw_factors(right, d)
    fig.suptitle(title)
    caption = (
        f"The {len(d['top'])} samples that express component {r} most, with contour lines "
        "of its spatial factor (upsampled) over them; its channel loadings; its sample "
        "factor, sorted."
    )
    return _finish(
        fig, out_stem, dpi, "component", title, d["tables"], caption, component=r, stats=d["stats"]
    )


def component_figures(
    model_or_path: Any,
    images: Any,
    out_dir: str | os.PathLike,
    *,
    components: Sequence[int] | None = None,
    prefix: str = "component",
    **kwargs: Any,
) -> list[FigureOutput]:
    """:func:`component_figure` for several components of one model (loaded once).

    Parameters
    ----------
    model_or_path : CPModel, RankSweep or path-like
        As for :func:`component_figure`.
    images : array-like
        ``N`` images, as for :func:`component_figure`.
    out_dir : path-like
        Folder for ``<prefix>_<r>.png`` and ``.svg`` (created).
    components : sequence of int, optional
        Default all ``0 .. R-1``.
    prefix : str
        File name prefix.
    **kwargs
        ``spatial_shape``, ``top_k``, ``labels``, ``class_names``, ``alpha``, ``dpi``.

    Returns
    -------
    list of FigureOutput
        One per component, in the order given.
    """
    model = load_model(model_or_path)
    comps = range(model.rank) if components is None else components
    width = len(str(model.rank - 1))
    return [
        component_figure(
            model, images, r, out_stem=Path(out_dir) / f"{prefix}_{int(r):0{width}d}", **kwargs
        )
        for r in comps
    ]


# ---------------------------------------------------------------------- classes


def class_component_figure(
    model_or_path: Any,
    labels: Any,
    out_stem: str | os.PathLike,
    class_names: Any = None,
    *,
    top_k: int | None = None,
    title: str | None = None,
    dpi: int = _DPI,
) -> FigureOutput:
    """Mean sample-factor weight per class and component, with each component's class purity.

    Parameters
    ----------
    model_or_path : CPModel, RankSweep or path-like
        A model with ``N`` samples and ``R`` components.
    labels : array-like
        ``N`` class labels (integers or strings), in sample order; none missing.
    out_stem : path-like
        Output path without suffix.
    class_names : sequence or mapping, optional
        Display names: ``class_names[label]``.
    top_k : int, optional
        Samples per component for the purity (default the mean class size).
    title : str, optional
    dpi : int

    Returns
    -------
    FigureOutput
        Tables ``"components"`` (``R`` rows: dominant class, purity) and
        ``"class_means"`` (``K`` rows: class, count, one column per component).

    Notes
    -----
    The weight is ``A`` for a nonnegative model and ``|A|`` otherwise. A
    component's purity is the share of its ``top_k`` samples that belong to its
    most common class among them; the dashed line is the share of the largest
    class, what a component blind to classes would score.
    """
    model = load_model(model_or_path)
    n = model.shape[0]
    labels = check_labels(labels, n)
    scores, signed = component_scores(model)
    classes, means, purity, dominant, k = class_purity(scores, labels, top_k)
    names = label_names(classes, class_names)
    counts = np.array([int(np.sum(labels == c)) for c in classes])
    rank, n_cls = model.rank, classes.size
    what = "|A|" if signed else "A"
    title = title or f"Classes x components (mean {what} per class; purity of top {k})"

    fig = _new_figure((max(6.0, 1.6 + 0.42 * rank), 3.4 + 0.22 * min(n_cls, 40)))
    ax_p, ax_m = fig.subplots(2, 1, height_ratios=[1, max(1.5, 0.12 * min(n_cls, 40))], sharex=True)
    comps = np.arange(rank)
    ax_p.bar(comps, purity, color="C0")
    ax_p.axhline(counts.max() / n, color="0.4", ls="--", lw=1, label="largest class share")
    for r in comps:
        ax_p.text(
            r,
            min(purity[r], 1.0) + 0.02,
            names[dominant[r]],
            rotation=90,
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax_p.set_ylim(0, 1.6)
    ax_p.set_yticks([0, 0.5, 1])
    ax_p.set_ylabel("purity")
    ax_p.legend(fontsize=7, loc="upper right")
    im = ax_m.imshow(means, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax_m, label=f"mean {what}")
    ax_m.set_xlabel("component")
    ax_m.set_ylabel("class")
    ax_m.set_xticks(comps)
    if n_cls <= 40:
        ax_m.set_yticks(np.arange(n_cls), names, fontsize=8)
    fig.suptitle(title)

    comp_rows = [
        {
            "component": int(r),
            "dominant_class": names[dominant[r]],
            "purity": float(purity[r]),
            "top_k": k,
            "weight": float(model.weights[r]),
        }
        for r in comps
    ]
    class_rows = [
        {"class": names[c], "n": int(counts[c]), **{f"c{r}": float(means[c, r]) for r in comps}}
        for c in range(n_cls)
    ]
    caption = (
        f"Mean {what} of each class's samples per component (bottom), and the share of "
        f"each component's top {k} samples in its dominant class (top)."
    )
    tables = {"components": comp_rows, "class_means": class_rows}
    stats = {"top_k": k, "mean_purity": float(purity.mean()), "n_classes": int(n_cls)}
    return _finish(fig, out_stem, dpi, "class_component", title, tables, caption, stats=stats)
