"""The component-importance figure: class x component logit changes, and what each component drives.

Starts from a :class:`peekcore.importance.ComponentImportance` or the ``.npz``
it was saved to (``peek importance --out importance.npz``; ``peek report
model.npz importance.npz`` shows it beside the model's class-purity view).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..importance import ComponentImportance
from ._common import label_names, load_saved
from .figures import FigureOutput, _finish, _new_figure
from .html import LayerSection

__all__ = ["importance_figure", "importance_sections", "load_importance"]

_DPI = 110
#: What each mode's change is measured against, for the caption.
_AGAINST = {
    "remove": "removed (against the unedited network)",
    "keep": "kept alone (against the layer set to zero)",
}


def load_importance(obj: Any) -> ComponentImportance:
    """A :class:`ComponentImportance` from itself or from the file it was saved to."""
    return load_saved(obj, ComponentImportance, "ComponentImportance")


def importance_figure(
    importance_or_path: Any,
    out_stem: str | os.PathLike,
    class_names: Any = None,
    *,
    top_k: int = 3,
    title: str | None = None,
    dpi: int = _DPI,
) -> FigureOutput:
    """Heatmaps of the mean class-logit change per component, one per mode, centred at zero.

    Parameters
    ----------
    importance_or_path : ComponentImportance or path-like
    out_stem : path-like
        Output path without suffix (``.png`` and ``.svg`` are written).
    class_names : sequence or mapping, optional
        Display names: ``class_names[k]`` for class index ``k``.
    top_k : int
        Classes listed per component (those it drives most).
    title : str, optional
    dpi : int

    Returns
    -------
    FigureOutput
        ``kind="importance"``; tables ``"components"`` (``R`` rows: the classes
        each component drives most per mode, with the logit change, and the
        accuracy changes) and ``"logit_change_<mode>"`` (``K`` rows: class, one
        column per component).

    Notes
    -----
    Red is a higher logit after the edit, blue a lower one; the colour scale
    is symmetric about zero per panel, so white is no change. Removing a
    component that drives a class turns that class's cell blue; keeping it
    alone turns it red.
    """
    imp = load_importance(importance_or_path)
    rank, n_cls = imp.rank, imp.n_classes
    names = label_names(np.arange(n_cls), class_names)
    title = title or (
        f"Layer {imp.layer}: mean change in each class's logit when a component is edited"
    )
    width = max(5.5, 1.8 + 0.38 * rank) * len(imp.modes)
    fig = _new_figure((width, 1.6 + 0.24 * min(n_cls, 40)))
    axes = np.atleast_1d(fig.subplots(1, len(imp.modes), squeeze=False)[0])
    from matplotlib.colors import CenteredNorm

    for ax, mode in zip(axes, imp.modes, strict=True):
        heat = imp.logit_change[mode].T  # classes x components
        half = float(np.max(np.abs(heat))) if heat.size else 0.0
        norm = CenteredNorm(vcenter=0.0, halfrange=half if half > 0 else 1.0)
        im = ax.imshow(heat, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="mean logit change")
        ax.set_title(f"component {_AGAINST[mode]}", fontsize=9)
        ax.set_xlabel("component")
        ax.set_xticks(np.arange(rank))
        if n_cls <= 40:
            ax.set_yticks(np.arange(n_cls), names, fontsize=8)
        ax.set_ylabel("class")
    fig.suptitle(title, fontsize=10)
    tables, caption = _tables(imp, names, top_k), _caption(imp)
    return _finish(fig, out_stem, dpi, "importance", title, tables, caption, stats=imp.summary())


def _tables(imp: ComponentImportance, names: list[str], top_k: int) -> dict[str, list[dict]]:
    tables = {"components": imp.table(top_k, names)}
    for mode in imp.modes:
        tables[f"logit_change_{mode}"] = [
            {"class": names[k], **{f"c{r}": float(v) for r, v in enumerate(col)}}
            for k, col in enumerate(imp.logit_change[mode].T)
        ]
    return tables


def _caption(imp: ComponentImportance) -> str:
    def pct(x: float) -> str:
        return "n/a (no labels)" if not math.isfinite(x) else f"{100 * x:.1f}%"

    return (
        f"Over {imp.n_samples} samples: the network's accuracy {pct(imp.baseline_accuracy)}; "
        f"with the layer replaced by the rank-{imp.rank} reconstruction "
        f"{pct(imp.reconstruction_accuracy)}, agreeing with the network's top class on "
        f"{100 * imp.reconstruction_agreement:.1f}% of samples (relative logit error "
        f"{imp.reconstruction_logit_error:.3g}). A component drives the classes whose logit "
        "drops when it is removed (blue, left) and rises when it is kept alone (red)."
    )


def importance_sections(
    importances: Sequence[str | os.PathLike],
    sections: Sequence[LayerSection],
    result_files: Sequence[str | os.PathLike],
    figures_dir: str | os.PathLike,
    class_names: Any = None,
) -> list[LayerSection]:
    """Put each importance file's figure beside the model it was computed from.

    Parameters
    ----------
    importances : sequence of path-like
        Files written by :meth:`ComponentImportance.save`.
    sections : sequence of LayerSection
        The report's sections, one per file of ``result_files``, in order.
    result_files : sequence of path-like
        The model or sweep file of each section.
    figures_dir : path-like
        Where figures are written.
    class_names : sequence or mapping, optional

    Returns
    -------
    list of LayerSection
        New sections for the importance files whose model (``metadata["result"]``)
        is not one of ``result_files``; the others' figures were appended to
        their model's section (after its class-purity view).
    """
    by_file = {}
    for f, sec in zip(result_files, sections, strict=True):
        by_file.setdefault(Path(f).resolve(), sec)
    new = []
    for i, path in enumerate(importances):
        imp = load_importance(path)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem) or "importance"
        fig = importance_figure(imp, Path(figures_dir) / f"importance{i}_{stem}", class_names)
        source = imp.metadata.get("result")
        section = by_file.get(Path(source).resolve()) if source else None
        if section is not None:
            section.figures.append(fig)
            continue
        new.append(
            LayerSection(
                name=f"{imp.layer} ({Path(path).name})",
                summary={"file": str(path), **imp.summary()},
                figures=[fig],
            )
        )
    return new
