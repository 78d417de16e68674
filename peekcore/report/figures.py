"""Figures from result files: rank sweep, components, classes x components, training quality.

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
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import require
from .._validate import check_int
from ._common import (
    check_component,
    check_labels,
    class_purity,
    component_scores,
    label_names,
    load_model,
    load_sweep,
    spatial_maps,
    top_samples,
    write_file,
)

__all__ = [
    "FigureOutput",
    "class_component_figure",
    "component_figure",
    "component_figures",
    "rank_sweep_figure",
    "training_quality_figure",
]

#: Keys every record of :func:`training_quality_figure` needs.
RECORD_KEYS = ("layer", "checkpoint", "accuracy", "rank")
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
        raise ValueError(f"out_stem {out_stem!r} has no file name: give e.g. 'figures/sweep'")
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


def _integer_ticks(ax, y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


# ---------------------------------------------------------------------- rank sweep


def rank_sweep_figure(
    sweep_or_path: Any,
    out_stem: str | os.PathLike,
    *,
    title: str | None = None,
    dpi: int = _DPI,
) -> FigureOutput:
    """Fit, core consistency and stability against rank, the chosen rank marked.

    Parameters
    ----------
    sweep_or_path : RankSweep or path-like
        A sweep of ``K`` ranks with ``P`` replicates each, or its ``.npz`` file.
    out_stem : path-like
        Output path without suffix; ``.png`` and ``.svg`` are written (folders
        are created).
    title : str, optional
        Default names the method, the replicates and the chosen rank.
    dpi : int
        PNG resolution.

    Returns
    -------
    FigureOutput
        Tables ``"ranks"`` (``K`` rows: the best replicate's scores and the
        rank's stability, as :meth:`RankSweep.table`) and ``"replicates"``
        (``K * P`` rows).
    """
    sweep = load_sweep(sweep_or_path)
    ranks = np.asarray(sweep.ranks)
    n_ranks, n_rep = sweep.fit.shape
    best = np.asarray(sweep.best, dtype=np.int64)
    idx = np.arange(n_ranks)
    chosen = sweep.chosen_rank
    title = title or (
        f"Rank sweep ({sweep.method}, {n_rep} replicate{'s' if n_rep > 1 else ''}): "
        f"chosen rank {chosen}"
    )
    fig = _new_figure((11.5, 3.8))
    ax_fit, ax_cc, ax_st = fig.subplots(1, 3, sharex=True)

    # fit: every replicate as a dot, the best replicate as a line
    rep_x = np.repeat(ranks, n_rep)
    ax_fit.scatter(rep_x, sweep.fit.ravel(), s=12, color="0.6", label="replicates", zorder=2)
    ax_fit.plot(ranks, sweep.fit[idx, best], "o-", color="C0", label="fit (best)", zorder=3)
    ax_fit.plot(
        ranks,
        sweep.explained_variance[idx, best],
        "s--",
        color="C2",
        ms=4,
        label="explained variance",
        zorder=3,
    )
    ax_fit.set_title("Fit")
    ax_fit.set_ylabel("fit, explained variance")

    # core consistency: clip very negative values to a floor, shown as down triangles
    cc = np.asarray(sweep.corcondia, dtype=np.float64)
    finite = cc[np.isfinite(cc)]
    low = float(np.min(finite)) if finite.size else 0.0
    floor = min(-5.0, max(low - 5.0, -105.0))
    clipped = cc < floor
    ax_cc.scatter(rep_x, np.where(clipped, floor, cc).ravel(), s=12, color="0.6", zorder=2)
    best_cc = cc[idx, best]
    ax_cc.plot(ranks, np.maximum(best_cc, floor), "o-", color="C1", label="best replicate")
    if clipped.any():
        ax_cc.scatter(
            rep_x[clipped.ravel()],
            np.full(int(clipped.sum()), floor),
            marker="v",
            color="k",
            s=24,
            zorder=4,
            label=f"below {floor:.0f}",
        )
    ax_cc.axhline(0, color="0.8", lw=0.8, zorder=1)
    ax_cc.set_ylim(floor - 5, 105)
    ax_cc.set_title("Core consistency (CORCONDIA)")
    ax_cc.set_ylabel("core consistency (%)")

    # stability: factor match among replicates that reached the best fit
    stab = np.asarray(sweep.stability, dtype=np.float64)
    ax_st.plot(
        ranks,
        np.asarray(sweep.reached_best),
        "s--",
        color="C4",
        ms=4,
        label="share reaching best fit",
    )
    if np.isfinite(stab).any():
        ax_st.plot(ranks, stab, "o-", color="C3", label="stability (FMS)")
    else:
        ax_st.text(
            0.5,
            0.5,
            "stability needs replicates > 1",
            transform=ax_st.transAxes,
            ha="center",
            va="center",
            color="0.4",
        )
    ax_st.set_ylim(-0.05, 1.05)
    ax_st.set_title("Stability")
    ax_st.set_ylabel("score")

    for ax in (ax_fit, ax_cc, ax_st):
        ax.axvline(chosen, color=_CHOSEN, ls=":", lw=1.5, zorder=1)
        ax.set_xlabel("rank")
        ax.grid(alpha=0.25)
        _integer_ticks(ax)
    ax_fit.plot([], [], color=_CHOSEN, ls=":", label=f"chosen rank {chosen}")
    k = sweep.ranks.index(chosen) if chosen in sweep.ranks else None
    if k is not None:
        ax_fit.plot(chosen, sweep.fit[k, best[k]], "*", color=_CHOSEN, ms=13, zorder=5)
        ax_cc.plot(chosen, max(best_cc[k], floor), "*", color=_CHOSEN, ms=13, zorder=5)
    for ax in (ax_fit, ax_cc, ax_st):
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    png, svg = _write(fig, out_stem, dpi)

    replicates = []
    for kk, r in enumerate(sweep.ranks):
        for p in range(n_rep):
            m = sweep.models[kk][p]
            replicates.append(
                {
                    "rank": int(r),
                    "replicate": p,
                    "fit": float(sweep.fit[kk, p]),
                    "explained_variance": float(sweep.explained_variance[kk, p]),
                    "corcondia": float(sweep.corcondia[kk, p]),
                    "degeneracy": float(sweep.degeneracy[kk, p]),
                    "n_iter": m.history.n_iter,
                    "converged": m.history.converged,
                    "best": p == int(best[kk]),
                }
            )
    return FigureOutput(
        kind="rank_sweep",
        title=title,
        png=png,
        svg=svg,
        tables={"ranks": sweep.table(), "replicates": replicates},
        caption=(
            "Fit and explained variance (higher is better), core consistency (near 100 "
            "means a valid trilinear structure) and stability (do replicates find the same "
            f"components?) against rank. {sweep.choice_reason}"
        ),
        stats={"chosen_rank": chosen, "choice_reason": sweep.choice_reason},
    )


# ---------------------------------------------------------------------- components


def _image_layout(images: Any, n: int) -> tuple[Any, str, tuple[int, int]]:
    """Check the images' shape; return them, their layout and ``(H, W)`` (nothing is copied)."""
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    shape = tuple(int(s) for s in images.shape)
    if len(shape) == 3:
        layout, hw = "gray", shape[1:3]
    elif len(shape) == 4 and shape[1] in (1, 3, 4):
        layout, hw = "first", shape[2:4]
    elif len(shape) == 4 and shape[3] in (1, 3, 4):
        layout, hw = "last", shape[1:3]
    else:
        raise ValueError(
            f"images have shape {shape}: expected N x H x W (grayscale), N x C x H x W or "
            "N x H x W x C with C in 1, 3 or 4"
        )
    if shape[0] != n:
        raise ValueError(
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
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if lo >= 0.0 and hi <= 1.0:
        return x
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``h x w`` map to ``H x W`` (``align_corners=False``)."""
    if m.shape == tuple(size):
        return m.copy()
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.ascontiguousarray(m), dtype=torch.float64)[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


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
    """One component: its top-k images with the spatial factor laid over, and its loadings.

    The top-k samples are the ``k`` largest entries of ``A[:, r]`` for a
    nonnegative model, of ``|A[:, r]|`` otherwise. The spatial map (``outer(C[:, r],
    D[:, r])`` for a 4-way model, ``C[:, r]`` reshaped to ``spatial_shape`` for
    a 3-way one) is upsampled bilinearly to the image size and drawn over each
    image with transparency ``alpha``; beside them are the map itself, the
    channel loadings ``B[:, r]`` and the sorted sample factor.

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
        Opacity of the heatmap over the images.
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
    a = model.factors[0][:, r]
    b = model.factors[1][:, r]
    weight = float(model.weights[r])
    title = title or f"Component {r} of {model.rank} (weight {weight:.4g})"

    fig = _new_figure((12.5, 6.4))
    left, right = fig.subfigures(1, 2, width_ratios=[1.2, 1.0])
    ncols = math.ceil(math.sqrt(len(top)))
    nrows = math.ceil(len(top) / ncols)
    grid = np.atleast_1d(left.subplots(nrows, ncols, squeeze=False)).ravel()
    heat = cmap = None
    vmin = vmax = None
    if maps is not None:
        m = maps[r]
        if signed:
            cmap = "RdBu_r"
            vmax = float(np.max(np.abs(m))) or 1.0
            vmin = -vmax
        else:
            cmap = "turbo"
            vmin, vmax = float(np.min(m)), float(np.max(m))
            vmax = vmax if vmax > vmin else vmin + 1.0
        heat = _upsample(m, img_hw)
    for ax, i in zip(grid, top, strict=False):
        img = _image(images, i, layout)
        ax.imshow(
            img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest"
        )
        if heat is not None:
            ax.imshow(heat, cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, interpolation="bilinear")
        caption = f"#{int(i)}  A={a[i]:.3g}"
        if names is not None:
            caption += f"\n{names[labels[i].item()]}"
        ax.set_title(caption, fontsize=8)
    for ax in grid:
        ax.set_axis_off()
    left.suptitle(f"Top {len(top)} samples by {'|A|' if signed else 'A'}, spatial factor over")

    ax_map, ax_b, ax_a = right.subplots(3, 1, height_ratios=[1.6, 1, 1])
    if maps is not None:
        im = ax_map.imshow(maps[r], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        right.colorbar(im, ax=ax_map, shrink=0.9)
        ax_map.set_title(f"Spatial factor ({maps.shape[1]} x {maps.shape[2]})", fontsize=10)
        ax_map.set_xlabel("x")
        ax_map.set_ylabel("y")
        _integer_ticks(ax_map, y=True)
    else:
        ax_map.text(0.5, 0.5, "no spatial mode", ha="center", va="center", color="0.4")
        ax_map.set_axis_off()
    channels = np.arange(b.shape[0])
    ax_b.bar(channels, b, width=1.0, color="C0")
    order_b = np.argsort(-(np.abs(b) if signed else b), kind="stable")
    for c in order_b[:3]:
        ax_b.annotate(
            str(int(c)), (c, b[c]), fontsize=7, ha="center", va="bottom" if b[c] >= 0 else "top"
        )
    ax_b.set_title("Channel loadings B[:, r]", fontsize=10)
    ax_b.set_xlabel("channel")
    ax_b.set_xlim(-0.5, b.shape[0] - 0.5)
    order_a = np.argsort(-scores[:, r], kind="stable")
    ax_a.plot(np.arange(n), a[order_a], color="C2", lw=1)
    ax_a.plot(np.arange(len(top)), a[top], "o", color=_CHOSEN, ms=3, label=f"top {len(top)}")
    ax_a.set_title(f"Sample factor A[:, r], sorted by {'|A|' if signed else 'A'}", fontsize=10)
    ax_a.set_xlabel("samples (sorted)")
    ax_a.legend(fontsize=7)
    fig.suptitle(title)
    png, svg = _write(fig, out_stem, dpi)

    top_rows = []
    for pos, i in enumerate(top):
        row = {"position": pos + 1, "sample": int(i), "A": float(a[i])}
        if names is not None:
            row["label"] = names[labels[i].item()]
        top_rows.append(row)
    chan_rows = [{"channel": int(c), "loading": float(b[c])} for c in order_b[:10]]
    stats: dict[str, Any] = {"component": r, "weight": weight, "signed": signed}
    tables: dict[str, list[dict]] = {"top_samples": top_rows, "top_channels": chan_rows}
    if maps is not None:
        m = maps[r]
        tables["spatial_map"] = [
            {"y": y, **{f"x{x}": float(m[y, x]) for x in range(m.shape[1])}}
            for y in range(m.shape[0])
        ]
        peak = np.unravel_index(int(np.argmax(np.abs(m) if signed else m)), m.shape)
        stats["peak_yx"] = [int(peak[0]), int(peak[1])]
    return FigureOutput(
        kind="component",
        title=title,
        png=png,
        svg=svg,
        tables=tables,
        caption=(
            f"The {len(top)} samples that express component {r} most, with its spatial "
            "factor (upsampled) over them; its channel loadings; its sample factor, sorted."
        ),
        component=r,
        stats=stats,
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
    png, svg = _write(fig, out_stem, dpi)

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
    return FigureOutput(
        kind="class_component",
        title=title,
        png=png,
        svg=svg,
        tables={"components": comp_rows, "class_means": class_rows},
        caption=(
            f"Mean {what} of each class's samples per component (bottom), and the share of "
            f"each component's top {k} samples in its dominant class (top)."
        ),
        stats={"top_k": k, "mean_purity": float(purity.mean()), "n_classes": int(n_cls)},
    )


# ---------------------------------------------------------------------- training quality


def _spearman(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    from scipy.stats import spearmanr

    n = int(x.size)
    if n < 3:
        return {"rho": math.nan, "p_value": math.nan, "n": n, "note": "fewer than 3 points"}
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": math.nan, "p_value": math.nan, "n": n, "note": "constant values"}
    with np.errstate(divide="ignore", invalid="ignore"):
        res = spearmanr(x, y)
    return {"rho": float(res.statistic), "p_value": float(res.pvalue), "n": n, "note": ""}


def _check_records(records: Any) -> list[dict]:
    if isinstance(records, dict) or not isinstance(records, Sequence) or not records:
        raise ValueError(
            "records must be a non-empty list of dicts with keys layer, checkpoint, accuracy "
            "and rank (one per layer and checkpoint)"
        )
    out, seen = [], set()
    for i, rec in enumerate(records):
        if not hasattr(rec, "keys"):
            raise TypeError(f"record {i} is a {type(rec).__name__}, not a dict")
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            raise ValueError(
                f"record {i} lacks {missing}: each record needs {list(RECORD_KEYS)}, e.g. "
                "{'layer': 'layer3', 'checkpoint': 10, 'accuracy': 0.71, 'rank': 12}"
            )
        try:
            acc, rank = float(rec["accuracy"]), float(rec["rank"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"record {i}: accuracy and rank must be numbers ({err})") from err
        if not (math.isfinite(acc) and math.isfinite(rank)):
            raise ValueError(f"record {i}: accuracy and rank must be finite, got {acc}, {rank}")
        key = (str(rec["layer"]), rec["checkpoint"])
        if key in seen:
            raise ValueError(f"record {i} repeats layer {key[0]!r} at checkpoint {key[1]!r}")
        seen.add(key)
        out.append(
            {
                "layer": key[0],
                "checkpoint": rec["checkpoint"],
                "accuracy": acc,
                "rank": int(rank) if rank == round(rank) else rank,
            }
        )
    return out


def training_quality_figure(
    records: Sequence[dict],
    out_stem: str | os.PathLike,
    *,
    title: str | None = None,
    dpi: int = _DPI,
) -> FigureOutput:
    """Chosen rank per layer against test accuracy across checkpoints, with Spearman's rho.

    Parameters
    ----------
    records : list of dict
        One per (layer, checkpoint): ``{"layer": str, "checkpoint": int or str,
        "accuracy": float, "rank": int}``. Checkpoints keep their first-seen order,
        or numeric order when all are numbers.
    out_stem : path-like
        Output path without suffix.
    title : str, optional
    dpi : int

    Returns
    -------
    FigureOutput
        Tables ``"records"`` and ``"spearman"`` (one row per layer and one for
        all layers pooled: ``rho``, ``p_value``, ``n``); ``stats["spearman"]``
        maps each layer (and ``"all layers"``) to the same numbers. Rho is nan
        with fewer than 3 points or a constant series.
    """
    recs = _check_records(records)
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in recs))
    if all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in checkpoints):
        checkpoints.sort()
    pos = {c: i for i, c in enumerate(checkpoints)}
    layers = list(dict.fromkeys(r["layer"] for r in recs))
    recs.sort(key=lambda r: (layers.index(r["layer"]), pos[r["checkpoint"]]))
    corr: dict[str, dict] = {}
    for layer in layers:
        rs = [r for r in recs if r["layer"] == layer]
        corr[layer] = _spearman(
            np.array([r["accuracy"] for r in rs]),
            np.array([r["rank"] for r in rs], dtype=np.float64),
        )
    overall = _spearman(
        np.array([r["accuracy"] for r in recs]),
        np.array([r["rank"] for r in recs], dtype=np.float64),
    )

    def rho_text(c: dict) -> str:
        if not math.isfinite(c["rho"]):
            return f"rho n/a ({c['note']})"
        return f"rho = {c['rho']:.2f} (p = {c['p_value']:.2g}, n = {c['n']})"

    title = title or f"Chosen rank vs test accuracy: Spearman {rho_text(overall)}"
    fig = _new_figure((12.0, 4.4))
    ax_t, ax_s = fig.subplots(1, 2)
    ax_acc = ax_t.twinx()
    acc_by_ckpt = [
        np.mean([r["accuracy"] for r in recs if r["checkpoint"] == c]) for c in checkpoints
    ]
    ax_acc.plot(np.arange(len(checkpoints)), acc_by_ckpt, "k--", marker="x", label="test accuracy")
    ax_acc.set_ylabel("test accuracy")
    for j, layer in enumerate(layers):
        rs = [r for r in recs if r["layer"] == layer]
        x = [pos[r["checkpoint"]] for r in rs]
        ranks = [r["rank"] for r in rs]
        accs = [r["accuracy"] for r in rs]
        color = f"C{j % 10}"
        ax_t.plot(x, ranks, "o-", color=color, label=layer)
        ax_s.plot(accs, ranks, "-", color=color, alpha=0.35)
        ax_s.scatter(accs, ranks, color=color, label=f"{layer}: {rho_text(corr[layer])}", zorder=3)
    ax_t.set_xticks(
        np.arange(len(checkpoints)),
        [str(c) for c in checkpoints],
        rotation=45 if len(checkpoints) > 8 else 0,
        fontsize=8,
    )
    ax_t.set_xlabel("checkpoint")
    ax_t.set_ylabel("chosen rank")
    ax_t.set_title("Chosen rank per layer across checkpoints")
    h1, l1 = ax_t.get_legend_handles_labels()
    h2, l2 = ax_acc.get_legend_handles_labels()
    ax_t.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    ax_s.set_xlabel("test accuracy")
    ax_s.set_ylabel("chosen rank")
    ax_s.set_title("Rank against accuracy (lines follow checkpoints)")
    ax_s.legend(fontsize=7, loc="best")
    for ax in (ax_t, ax_s):
        ax.grid(alpha=0.25)
    fig.suptitle(title)
    png, svg = _write(fig, out_stem, dpi)

    corr_all = {**corr, "all layers": overall}
    return FigureOutput(
        kind="training_quality",
        title=title,
        png=png,
        svg=svg,
        tables={
            "records": recs,
            "spearman": [{"layer": name, **c} for name, c in corr_all.items()],
        },
        caption=(
            "Left: the rank chosen for each layer at each checkpoint, and the test accuracy "
            "(dashed). Right: rank against accuracy, with Spearman's rank correlation per "
            "layer and over all layers pooled."
        ),
        stats={"spearman": corr_all},
    )
