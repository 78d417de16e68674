"""The rank-sweep figure: fit, core consistency and stability against rank.

The tables behind the figure are computed first (:func:`rank_sweep_tables`),
then each panel is drawn from them by its own helper, so what the figure shows
and what the report's tables list are the same numbers.

Core consistency (CORCONDIA) is 100 for a model whose core is the ideal
superdiagonal one and falls without bound as the model stops being trilinear
(``-5e11`` happens at ranks far above what the data holds). The figure and the
``core_consistency`` column show it clipped to ``[0, 100]``; the raw value
stays in ``corcondia``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._common import load_sweep
from .figures import _CHOSEN, _DPI, FigureOutput, _finish, _integer_ticks, _new_figure

__all__ = ["CC_RANGE", "clip_core_consistency", "rank_sweep_figure", "rank_sweep_tables"]

#: The range core consistency is shown in (values outside are clipped; raw kept).
CC_RANGE = (0.0, 100.0)


def clip_core_consistency(cc: Any) -> np.ndarray:
    """Core consistency clipped to :data:`CC_RANGE` for display (NaN stays NaN)."""
    cc = np.asarray(cc, dtype=np.float64)
    return np.where(np.isnan(cc), np.nan, np.clip(cc, *CC_RANGE))


def rank_sweep_tables(sweep_or_path: Any) -> dict[str, list[dict]]:
    """The numbers behind :func:`rank_sweep_figure`, one table per level.

    Returns
    -------
    dict
        ``"ranks"``: one row per rank, :meth:`RankSweep.table`'s columns plus
        ``core_consistency`` (clipped to ``[0, 100]``); ``"replicates"``: one row
        per rank and replicate, with its fit, explained variance, clipped and
        raw core consistency, degeneracy, iterations and convergence.
    """
    sweep = load_sweep(sweep_or_path)
    ranks_rows = []
    for row in sweep.table():
        shown = float(clip_core_consistency(row["corcondia"]))
        ranks_rows.append({**row, "core_consistency": shown})
    shown_all = clip_core_consistency(sweep.corcondia)
    replicates = []
    for k, r in enumerate(sweep.ranks):
        for p in range(sweep.replicates):
            m = sweep.models[k][p]
            replicates.append(
                {
                    "rank": int(r),
                    "replicate": p,
                    "fit": float(sweep.fit[k, p]),
                    "explained_variance": float(sweep.explained_variance[k, p]),
                    "core_consistency": float(shown_all[k, p]),
                    "corcondia": float(sweep.corcondia[k, p]),
                    "degeneracy": float(sweep.degeneracy[k, p]),
                    "n_iter": m.history.n_iter,
                    "converged": m.history.converged,
                    "best": p == int(sweep.best[k]),
                }
            )
    return {"ranks": ranks_rows, "replicates": replicates}


def _columns(rows: list[dict], *keys: str) -> list[np.ndarray]:
    return [np.array([row[k] for row in rows], dtype=np.float64) for k in keys]


def _fit_panel(ax, tables: dict[str, list[dict]]) -> None:
    """Every replicate's fit as a grey dot, the best replicate's fit and explained variance."""
    rep_x, rep_fit = _columns(tables["replicates"], "rank", "fit")
    ranks, fit, ev = _columns(tables["ranks"], "rank", "fit", "explained_variance")
    ax.scatter(rep_x, rep_fit, s=12, color="0.6", label="replicates", zorder=2)
    ax.plot(ranks, fit, "o-", color="C0", label="fit (best)", zorder=3)
    # open squares over filled circles: where fit and explained variance meet, both show
    ax.plot(ranks, ev, "s--", color="C2", ms=6, mfc="none", label="explained variance", zorder=4)
    ax.set_title("Fit")
    ax.set_ylabel("fit, explained variance")


def _cc_panel(ax, tables: dict[str, list[dict]]) -> None:
    """Core consistency clipped to [0, 100]; clipped values as open down-triangles at 0."""
    rep_x, rep_cc, rep_raw = _columns(tables["replicates"], "rank", "core_consistency", "corcondia")
    ranks, cc, raw = _columns(tables["ranks"], "rank", "core_consistency", "corcondia")
    ax.scatter(rep_x, rep_cc, s=12, color="0.6", zorder=2)
    ax.plot(ranks, cc, "o-", color="C1", label="best replicate", zorder=3)
    low = rep_raw < CC_RANGE[0]
    if low.any():
        ax.scatter(
            rep_x[low],
            np.full(int(low.sum()), CC_RANGE[0]),
            marker="v",
            facecolors="none",
            edgecolors="k",
            s=40,
            zorder=4,
            label="below 0 (raw value in the table)",
        )
    ax.axhline(50, color="0.8", lw=0.8, ls="--", zorder=1)
    ax.set_ylim(CC_RANGE[0] - 6, CC_RANGE[1] + 6)
    ax.set_title("Core consistency (clipped to 0-100)")
    ax.set_ylabel("core consistency (%)")


def _stability_panel(ax, tables: dict[str, list[dict]]) -> None:
    """Factor match among replicates that reached the best fit, and how many did."""
    ranks, stab, reached = _columns(tables["ranks"], "rank", "stability", "reached_best")
    ax.plot(ranks, reached, "s--", color="C4", ms=6, mfc="none", label="share reaching best fit")
    if np.isfinite(stab).any():
        ax.plot(ranks, stab, "o-", color="C3", ms=4, label="stability (FMS)")
    else:
        ax.text(
            0.5,
            0.5,
            "stability needs replicates > 1",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="0.4",
        )
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Stability")
    ax.set_ylabel("score")


def _mark_chosen(axes, tables: dict[str, list[dict]], chosen: int) -> None:
    """A dotted line at the chosen rank on every panel, a star on its fit and consistency."""
    for ax in axes:
        ax.axvline(chosen, color=_CHOSEN, ls=":", lw=1.5, zorder=1)
        ax.set_xlabel("rank")
        ax.grid(alpha=0.25)
        _integer_ticks(ax)
    axes[0].plot([], [], color=_CHOSEN, ls=":", label=f"chosen rank {chosen}")
    row = next((r for r in tables["ranks"] if r["rank"] == chosen), None)
    if row is not None:
        axes[0].plot(chosen, row["fit"], "*", color=_CHOSEN, ms=13, zorder=5)
        axes[1].plot(chosen, row["core_consistency"], "*", color=_CHOSEN, ms=13, zorder=5)
    for ax in axes:
        ax.legend(fontsize=7, loc="best")


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
        Tables ``"ranks"`` and ``"replicates"`` (see :func:`rank_sweep_tables`).
    """
    sweep = load_sweep(sweep_or_path)
    tables = rank_sweep_tables(sweep)
    n_rep = sweep.replicates
    chosen = sweep.chosen_rank
    title = title or (
        f"Rank sweep ({sweep.method}, {n_rep} replicate{'s' if n_rep > 1 else ''}): "
        f"chosen rank {chosen}"
    )
    fig = _new_figure((11.5, 3.8))
    axes = fig.subplots(1, 3, sharex=True)
    _fit_panel(axes[0], tables)
    _cc_panel(axes[1], tables)
    _stability_panel(axes[2], tables)
    _mark_chosen(axes, tables, chosen)
    fig.suptitle(title)
    caption = (
        "Fit and explained variance (higher is better), core consistency (near 100 "
        "means a valid trilinear structure; shown clipped to 0-100, raw values in the "
        "tables' corcondia column) and stability (do replicates find the same "
        f"components?) against rank. {sweep.choice_reason}"
    )
    stats = {"chosen_rank": chosen, "choice_reason": sweep.choice_reason}
    return _finish(fig, out_stem, dpi, "rank_sweep", title, tables, caption, stats=stats)
