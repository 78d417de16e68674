"""The training-quality figure: chosen rank per layer against accuracy across checkpoints.

The Spearman table is computed before anything is drawn
(:func:`training_quality_tables`); the drawing reads it.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError
from .figures import _DPI, FigureOutput, _finish, _new_figure

__all__ = ["RECORD_KEYS", "training_quality_figure", "training_quality_tables"]

#: Keys every record of :func:`training_quality_figure` needs.
RECORD_KEYS = ("layer", "checkpoint", "accuracy", "rank")

#: One marker per layer, so layers drawn on the same points stay told apart.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


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
        raise InvalidArgumentError(
            "records must be a non-empty list of dicts with keys layer, checkpoint, accuracy "
            "and rank (one per layer and checkpoint)"
        )
    out, seen = [], set()
    for i, rec in enumerate(records):
        if not hasattr(rec, "keys"):
            raise InvalidTypeError(f"record {i} is a {type(rec).__name__}, not a dict")
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            raise InvalidArgumentError(
                f"record {i} lacks {missing}: each record needs {list(RECORD_KEYS)}, e.g. "
                "{'layer': 'layer3', 'checkpoint': 10, 'accuracy': 0.71, 'rank': 12}"
            )
        try:
            acc, rank = float(rec["accuracy"]), float(rec["rank"])
        except (TypeError, ValueError) as err:
            raise InvalidArgumentError(
                f"record {i}: accuracy and rank must be numbers ({err})"
            ) from err
        if not (math.isfinite(acc) and math.isfinite(rank)):
            raise InvalidArgumentError(
                f"record {i}: accuracy and rank must be finite, got {acc}, {rank}"
            )
        key = (str(rec["layer"]), rec["checkpoint"])
        if key in seen:
            raise InvalidArgumentError(
                f"record {i} repeats layer {key[0]!r} at checkpoint {key[1]!r}"
            )
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


def _rho_text(c: dict) -> str:
    if not math.isfinite(c["rho"]):
        return f"rho n/a ({c['note']})"
    return f"rho = {c['rho']:.2f} (p = {c['p_value']:.2g}, n = {c['n']})"


def training_quality_tables(records: Any) -> dict[str, Any]:
    """The numbers behind :func:`training_quality_figure`.

    Returns
    -------
    dict
        ``"records"`` (sorted by layer, then checkpoint), ``"spearman"`` (one
        row per layer and one for all layers pooled), and for drawing
        ``"checkpoints"`` (in order) and ``"layers"`` (in first-seen order).
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
    corr["all layers"] = _spearman(
        np.array([r["accuracy"] for r in recs]),
        np.array([r["rank"] for r in recs], dtype=np.float64),
    )
    return {
        "records": recs,
        "spearman": [{"layer": name, **c} for name, c in corr.items()],
        "checkpoints": checkpoints,
        "layers": layers,
    }


def _draw_quality(fig, tables: dict[str, Any]) -> None:
    """Rank per checkpoint (left) and rank against accuracy (right), one marker per layer.

    Layers are shifted a little apart along the checkpoint axis and drawn with
    open markers of their own shape, so one layer's points never hide another's.
    """
    from matplotlib.ticker import MaxNLocator

    recs, checkpoints, layers = tables["records"], tables["checkpoints"], tables["layers"]
    corr = {row["layer"]: row for row in tables["spearman"]}
    pos = {c: i for i, c in enumerate(checkpoints)}
    ax_t, ax_s = fig.subplots(1, 2)
    ax_acc = ax_t.twinx()
    acc_by_ckpt = [
        np.mean([r["accuracy"] for r in recs if r["checkpoint"] == c]) for c in checkpoints
    ]
    ax_acc.plot(np.arange(len(checkpoints)), acc_by_ckpt, "k--", marker="x", label="test accuracy")
    ax_acc.set_ylabel("test accuracy")
    step = 0.08 if len(layers) > 1 else 0.0
    for j, layer in enumerate(layers):
        rs = [r for r in recs if r["layer"] == layer]
        shift = (j - (len(layers) - 1) / 2) * step
        x = [pos[r["checkpoint"]] + shift for r in rs]
        ranks = [r["rank"] for r in rs]
        accs = [r["accuracy"] for r in rs]
        style = dict(color=f"C{j % 10}", marker=_MARKERS[j % len(_MARKERS)], mfc="none", ms=7)
        ax_t.plot(x, ranks, "-", label=layer, **style)
        ax_s.plot(accs, ranks, "-", alpha=0.35, label=f"{layer}: {_rho_text(corr[layer])}", **style)
    ax_t.set_xticks(
        np.arange(len(checkpoints)),
        [str(c) for c in checkpoints],
        rotation=45 if len(checkpoints) > 8 else 0,
        fontsize=8,
    )
    for ax in (ax_t, ax_s):  # ranks are whole numbers
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.25)
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
    tables = training_quality_tables(records)
    corr_all = {
        row["layer"]: {k: v for k, v in row.items() if k != "layer"} for row in tables["spearman"]
    }
    title = title or f"Chosen rank vs test accuracy: Spearman {_rho_text(corr_all['all layers'])}"
    fig = _new_figure((12.0, 4.4))
    _draw_quality(fig, tables)
    fig.suptitle(title)
    caption = (
        "Left: the rank chosen for each layer at each checkpoint (layers shifted slightly "
        "apart so none hides another), and the test accuracy (dashed). Right: rank against "
        "accuracy, with Spearman's rank correlation per layer and over all layers pooled."
    )
    shown = {"records": tables["records"], "spearman": tables["spearman"]}
    stats = {"spearman": corr_all}
    return _finish(fig, out_stem, dpi, "training_quality", title, shown, caption, stats=stats)
