"""The rank-profile figure and report: each rank measure against quality, per layer.

Both start from a :class:`peekcore.profile.RankProfile` or the ``.npz`` it was
saved to (``peek report profile.npz``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._common import load_saved
from .figures import FigureOutput, _new_figure, _write

__all__ = ["profile_report", "rank_profile_figure"]

_DPI = 110
#: measures drawn on an integer axis (ranks and component counts)
_INTEGER = ("autoten", "fit_elbow", "stable", "class_components")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")


def _load(profile_or_path: Any):
    from ..profile.profile import RankProfile

    return load_saved(profile_or_path, RankProfile, "RankProfile")


def _rho_text(a: Any) -> str:
    if a is None or not math.isfinite(a.rho):
        return "rho undefined" + (f" (n = {a.n})" if a is not None else "")
    return f"rho = {a.rho:+.2f} [{a.ci[0]:+.2f}, {a.ci[1]:+.2f}], p = {a.p_value:.3g}, n = {a.n}"


def _hue(points: list[dict]) -> tuple[list[Any], str]:
    """Colour key per point: the label noise where every point has one, else the seed."""
    if points and all("label_noise" in (p.get("info") or {}) for p in points):
        return [p["info"]["label_noise"] for p in points], "label noise"
    return [p["seed"] for p in points], "seed"


def _panel(ax, profile, layer: str, measure: str, hues: dict, seeds: list) -> dict:
    """One measure against quality in one layer; returns the row of the figure's table."""
    from ..profile.profile import UNDEFINED

    pts = [p for p in profile.points if p["layer"] == layer]
    keys, _ = _hue(pts)
    undefined = 0
    offsets = {s: (i - (len(seeds) - 1) / 2) * 0.12 for i, s in enumerate(seeds)}
    for p, key in zip(pts, keys, strict=True):
        v = p["measures"][measure]
        if v is None or not math.isfinite(v):
            undefined += 1
            continue
        lo, hi = p["interval"].get(measure, (math.nan, math.nan))
        # integer measures: seeds side by side (+-0.12 at most) so equal values stay visible
        dy = offsets.get(p["seed"], 0.0) if measure in _INTEGER else 0.0
        err = None
        if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
            err = [[max(v - lo, 0.0)], [max(hi - v, 0.0)]]
        ax.errorbar(
            [p["quality"]],
            [v + dy],
            yerr=err,
            fmt=_MARKERS[seeds.index(p["seed"]) % len(_MARKERS)],
            mfc="none",
            mec=hues[key],
            ecolor=hues[key],
            elinewidth=0.8,
            capsize=2,
            ms=6,
            alpha=0.85,
        )
    try:
        a = profile.association(layer, measure)
    except KeyError:
        a = None
    ax.set_title(f"{layer}, {measure}\n{_rho_text(a)}", fontsize=8)
    if undefined:
        ax.text(
            0.02,
            0.98,
            f"{undefined} of {len(pts)} undefined:\n{UNDEFINED.get(measure, 'nan')}",
            transform=ax.transAxes,
            va="top",
            fontsize=6.5,
            color="#8b0000",
            wrap=True,
        )
    if measure in _INTEGER:
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        lo, hi = ax.get_ylim()
        if hi - lo < 2:  # one value (or two): whole ranks around it, not fractions
            mid = round((lo + hi) / 2)
            lo, hi = mid - 1.5, mid + 1.5
        ax.set_ylim(max(lo, -0.5), hi)  # counts and ranks are never negative
    ax.grid(alpha=0.25)
    return {
        "layer": layer,
        "measure": measure,
        "rho": None if a is None else a.rho,
        "ci": None if a is None else list(a.ci),
        "p_value": None if a is None else a.p_value,
        "n": None if a is None else a.n,
        "undefined": undefined,
    }


def rank_profile_figure(
    profile_or_path: Any, out_stem: str | os.PathLike, *, dpi: int = _DPI
) -> FigureOutput:
    """Each rank measure against quality, one panel per (measure, layer), with error bars.

    Rows are measures, columns layers. Error bars: the 2.5% to 97.5% bootstrap
    interval over samples of each point. Colours: label noise (or the seed);
    markers: the training seed; hollow markers, and on integer axes the seeds
    side by side (offsets of at most 0.12), so equal values stay visible.
    Panel titles give Spearman's rho with its bootstrap 95% interval, the
    permutation p-value and n; undefined points are counted with the reason.

    Parameters
    ----------
    profile_or_path : RankProfile or path
    out_stem : path-like
        Output path without suffix (``.png`` and ``.svg`` are written).
    dpi : int

    Returns
    -------
    FigureOutput
        Table ``"associations"``: one row per panel.
    """
    profile = _load(profile_or_path)
    measures = profile.measures
    seeds = list(dict.fromkeys(p["seed"] for p in profile.points))
    keys, hue_name = _hue(profile.points)
    levels = sorted(set(keys), key=lambda k: (k is None, k))
    hues = {k: f"C{i % 10}" for i, k in enumerate(levels)}
    n_rows, n_cols = len(measures), len(profile.layers)
    fig = _new_figure((3.6 * n_cols + 0.8, 2.5 * n_rows + 0.8))
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    rows = []
    for i, m in enumerate(measures):
        for j, layer in enumerate(profile.layers):
            ax = axes[i, j]
            rows.append(_panel(ax, profile, layer, m, hues, seeds))
            if i == n_rows - 1:
                ax.set_xlabel(profile.quality_name)
            if j == 0:
                ax.set_ylabel(m)
    from matplotlib.lines import Line2D

    handles = []
    if hue_name != "seed":  # colours carry the seed otherwise, and the markers already do
        handles += [
            Line2D([], [], ls="", marker="o", mfc="none", mec=hues[k], label=f"{hue_name} {k}")
            for k in levels
        ]
    if seeds != [None]:
        handles += [
            Line2D(
                [],
                [],
                ls="",
                marker=_MARKERS[i % len(_MARKERS)],
                mfc="none",
                mec="k",
                label=f"seed {s}",
            )
            for i, s in enumerate(seeds)
        ]
    if handles:
        fig.legend(
            handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=7
        )
    title = f"Rank measures against {profile.quality_name}: {profile.verdict}"
    fig.suptitle(_wrap(title, 140), fontsize=9)
    png, svg = _write(fig, out_stem, dpi)
    return FigureOutput(
        kind="rank_profile",
        title="Rank measures against " + profile.quality_name,
        png=png,
        svg=svg,
        tables={"associations": rows},
        caption=(
            f"Each rank measure (rows) against {profile.quality_name} per layer (columns), one "
            "marker per (network, checkpoint). Error bars: 95% bootstrap interval over samples "
            "(models held fixed). Hollow markers; on integer axes the seeds are drawn side by "
            "side (offsets of at most 0.12), so equal values do not hide one another. Titles: "
            "Spearman's rho [bootstrap 95% CI], permutation p-value, points used."
        ),
        stats={"verdict": profile.verdict},
    )


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _association_rows(profile) -> list[dict]:
    return [
        {
            "layer": a.layer,
            "measure": a.measure,
            # an undefined rho says why where it is shown (a constant measure, too few points)
            "rho": a.rho if math.isfinite(a.rho) else f"undefined: {a.reason or 'no points'}",
            "tau": a.tau,
            "ci_low": a.ci[0],
            "ci_high": a.ci[1],
            "p_value": a.p_value,
            "p_holm": getattr(a, "p_adjusted", math.nan),
            "n": a.n,
            "verdict": a.verdict,
        }
        for a in profile.associations
    ]


def _point_rows(profile, layer: str) -> list[dict]:
    from ..profile.profile import UNDEFINED

    rows = []
    for p in profile.points:
        if p["layer"] != layer:
            continue
        row = {"checkpoint": p["checkpoint"], "seed": p["seed"], profile.quality_name: p["quality"]}
        for m, v in p["measures"].items():
            lo, hi = p["interval"].get(m, (math.nan, math.nan))
            row[m] = (
                v if v is not None and math.isfinite(v) else f"undefined ({UNDEFINED.get(m, m)})"
            )
            row[f"{m} 95% interval"] = f"[{_num(lo)}, {_num(hi)}]"
        rows.append(row)
    return rows


def _num(v: Any) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.3g}"


def profile_report(
    profile_or_path: Any,
    out: str | os.PathLike,
    *,
    title: str | None = None,
    sweeps: Mapping[tuple[str, str], Any] | None = None,
    more_sections: Sequence[Any] = (),
) -> Path:
    """One HTML report of a rank profile: the verdict on top, the figure, the tables.

    Parameters
    ----------
    profile_or_path : RankProfile or path
    out : path-like
        The ``.html`` file; figures go to ``<stem>_figures/`` beside it.
    title : str, optional
    sweeps : dict, optional
        ``(checkpoint, layer) -> RankSweep`` or its file: example sweeps drawn
        in each layer's section.
    more_sections : sequence of LayerSection, optional
        More sections, shown after the layers' (e.g. the demo's importance view).

    Returns
    -------
    pathlib.Path
    """
    from ..profile.measures import MEASURE_RULES
    from ..profile.profile import UNDEFINED
    from . import rank_sweep_figure
    from .html import LayerSection, write_report

    profile = _load(profile_or_path)
    out = Path(out)
    figs = out.parent / f"{out.stem}_figures"
    main = rank_profile_figure(profile, figs / "rank_profile")
    main.tables = {
        "associations": _association_rows(profile),
        "measure rules": [
            {"measure": m, "rule": MEASURE_RULES.get(m, ""), "undefined when": UNDEFINED.get(m, "")}
            for m in profile.measures
        ],
        "spread over seeds": profile.seed_spread(),
    }
    sections = []
    for layer in profile.layers:
        layer_figs = []
        for (ckpt, lay), sweep in (sweeps or {}).items():
            if lay == layer and (not isinstance(sweep, (str, os.PathLike)) or Path(sweep).exists()):
                stem = f"{layer}_{ckpt}_sweep".replace("/", "_")
                layer_figs.append(rank_sweep_figure(sweep, figs / stem, title=f"{layer}, {ckpt}"))
        n = sum(p["layer"] == layer for p in profile.points)
        sections.append(
            LayerSection(
                name=layer,
                summary={"points": n, "verdict": profile.verdicts.get(layer, "")},
                figures=layer_figs,
                tables={"points": _point_rows(profile, layer)},
            )
        )
    notes = f"Verdict: {profile.verdict}. " + ". ".join(profile.verdicts.values()) + "."
    return write_report(
        out,
        title=title or f"Rank profile: rank measures against {profile.quality_name}",
        settings={
            "layers": profile.layers,
            "ranks": f"{profile.ranks[0]} to {profile.ranks[-1]} ({len(profile.ranks)} ranks)",
            "points": len(profile.points),
            **profile.settings,
            "seconds": round(profile.seconds, 1),
        },
        layers=[*sections, *more_sections],
        figures=[main],
        notes=notes,
    )
