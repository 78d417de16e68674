"""A whole report from result files: the one entry the command line and the demo call.

:func:`build_report` loads every result first (nothing is written if one is
unreadable), names each section after the layer its result came from (the
``source`` every result file records; the file's name when there is none),
draws the figures a result supports (rank sweep, classes x components,
components over the input images) and writes the HTML page beside its
``<name>_figures/`` folder.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingInputError
from ..model import CPModel
from ..npyfile import NpyArray, open_npy
from ..sweep import RankSweep
from ._common import _file_format, load_result
from .figures import class_component_figure, component_figure
from .html import LayerSection, write_report
from .importance_figures import importance_sections
from .sweep_figure import rank_sweep_figure

__all__ = ["BuiltReport", "build_report", "file_stems", "section_names"]


@dataclass
class BuiltReport:
    """What :func:`build_report` wrote.

    Attributes
    ----------
    path : pathlib.Path
        The HTML file.
    figures_dir : pathlib.Path
        The folder of its figures (PNG and SVG).
    sections : list of str
        The section names, one per result, in order.
    """

    path: Path
    figures_dir: Path
    sections: list[str] = field(default_factory=list)


def section_names(paths: Sequence[Path]) -> list[str]:
    """One distinct name per file: its stem, with parent folders as needed to tell it apart.

    ``runA/sweep`` and ``runB/sweep`` for two ``sweep.npz``; a file given more
    than once gets `` (2)``, `` (3)``, ... on its repeats.
    """
    keys = [Path(p).resolve().with_suffix("").parts for p in paths]
    depth = [1] * len(keys)
    while True:
        names = ["/".join(k[-d:]) for k, d in zip(keys, depth, strict=True)]
        grow = [
            i
            for i, name in enumerate(names)
            if depth[i] < len(keys[i])
            and any(n == name and keys[j] != keys[i] for j, n in enumerate(names) if j != i)
        ]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    return _number_repeats(names)


def _number_repeats(names: list[str]) -> list[str]:
    out, seen = [], {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def file_stems(names: Sequence[str]) -> list[str]:
    """Distinct, file-safe figure stems, one per section (``runA/sweep`` -> ``runA_sweep``)."""
    taken: set[str] = set()
    out = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "result"
        stem, i = base, 2
        while stem.lower() in taken:  # case-insensitive file systems too
            stem, i = f"{base}_{i}", i + 1
        taken.add(stem.lower())
        out.append(stem)
    return out


def _source(result: CPModel | RankSweep) -> dict:
    source = (result.metadata or {}).get("source")
    return source if isinstance(source, dict) else {}


def _names(results: list, paths: list[Path | None]) -> list[str]:
    """Section names: the layer a result came from, else its file's name, else its position."""
    by_file = section_names(
        [p if p is not None else Path(f"result {i + 1}") for i, p in enumerate(paths)]
    )
    layers = [_source(r).get("layer") for r in results]
    names = []
    for i, layer in enumerate(layers):
        if layer is None:
            names.append(by_file[i])
        elif layers.count(layer) == 1:
            names.append(str(layer))
        else:  # the same layer in several files (a sweep and a model of it)
            names.append(f"{layer} ({by_file[i]})")
    return _number_repeats(names)


def _is_importance(path: Path) -> bool:
    return _file_format(path) == "peekcore.ComponentImportance"


def _spatial(model: CPModel, spatial_shape: Sequence[int] | None) -> tuple[int, int] | None:
    """The ``(H, W)`` of a 3-way model's spatial mode: given, or square when it is one."""
    if spatial_shape is not None:
        h, w = (int(v) for v in spatial_shape)
        return h, w
    if len(model.shape) == 3:
        side = int(round(model.shape[2] ** 0.5))
        if side * side == model.shape[2]:
            return side, side
    return None


def _array(value: Any, what: str) -> Any:
    """An array given, or an ``.npy`` file's: read by samples as figures index it
    (:class:`~peekcore.npyfile.NpyArray`), never memory-mapped unless Fortran-ordered."""
    if value is None or not isinstance(value, str | os.PathLike):
        return value
    path = Path(value)
    if not path.exists():
        raise MissingInputError(f"no such {what} file: {path} (give an .npy file)")
    return open_npy(path, by_sample=True)  # a folder or FIFO: a DataError that says so


def _summary(result: CPModel | RankSweep, model: CPModel, path: Path | None) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if path is not None:
        summary["file"] = str(path)
    summary.update({k: v for k, v in _source(result).items()})
    summary.update({"shape": list(model.shape), "rank": model.rank, "fit": model.fit})
    if isinstance(result, RankSweep):
        summary["chosen rank"] = result.chosen_rank
        summary["ranks swept"] = f"{result.ranks[0]}-{result.ranks[-1]}"
    return summary


def _section(
    name: str,
    stem: str,
    result: CPModel | RankSweep,
    path: Path | None,
    figs: Path,
    images: Any,
    labels: Any,
    components: int,
    spatial_shape: Sequence[int] | None,
) -> LayerSection:
    """One result's section: its summary and the figures it supports."""
    model = result.model() if isinstance(result, RankSweep) else result
    figures, comps = [], []
    if isinstance(result, RankSweep):
        figures.append(rank_sweep_figure(result, figs / f"{stem}_sweep"))
    if labels is not None:
        figures.append(class_component_figure(model, labels, figs / f"{stem}_classes"))
    if images is not None:
        for r in range(min(model.rank, components)):
            comps.append(
                component_figure(
                    model,
                    images,
                    r,
                    out_stem=figs / f"{stem}_c{r}",
                    labels=labels,
                    spatial_shape=_spatial(model, spatial_shape),
                )
            )
    return LayerSection(
        name=name, summary=_summary(result, model, path), figures=figures, components=comps
    )


def build_report(
    results: Sequence[Any] | Mapping[str, Any],
    out: str | os.PathLike,
    *,
    images: Any = None,
    labels: Any = None,
    components: int = 4,
    spatial_shape: Sequence[int] | None = None,
    title: str = "peekcore report",
    settings: Mapping[str, Any] | None = None,
    notes: str = "",
    overview: Sequence[Any] = (),
) -> BuiltReport:
    """Write an HTML report of fitted models and rank sweeps, with its figures.

    Parameters
    ----------
    results : sequence or mapping
        Results (``CPModel``, ``RankSweep``) or their files (``.npz``), in
        order; a mapping gives each its section name. Files written by
        ``ComponentImportance.save`` add their figure to the section of the
        model they were computed from. Without one, a section is
        named after the layer the result came from (its ``source``), else after
        its file.
    out : path-like
        The ``.html`` file; figures go to ``<stem>_figures/`` beside it.
    images : array or path, optional
        The ``N`` input images the results' samples came from (``N x H x W``,
        ``N x C x H x W`` or ``N x H x W x C``): component figures for the first
        ``components`` components of each result.
    labels : array or path, optional
        ``N`` class labels: a classes x components figure per result.
    components : int
        Components drawn per result (with ``images``).
    spatial_shape : (int, int), optional
        ``(H, W)`` of a 3-way model's spatial mode (default: square when it is one).
    title, notes : str
        The page's title and a paragraph under it.
    settings : mapping, optional
        Shown as the settings table (default: the result files).
    overview : sequence, optional
        Figures across results, shown before the sections
        (:class:`~peekcore.report.figures.FigureOutput`, paths or dicts).

    Returns
    -------
    BuiltReport
    """
    if isinstance(results, Mapping):
        given_names: list[str] | None = [str(k) for k in results]
        items = list(results.values())
    else:
        given_names, items = None, list(results)
    paths = [Path(x) if isinstance(x, str | os.PathLike) else None for x in items]
    for p in paths:
        if p is not None and not p.exists():
            raise MissingInputError(f"no such result file: {p}")
    # component-importance files join the section of the model they were computed from
    importances = [p for p in paths if p is not None and _is_importance(p)]
    keep = [i for i, p in enumerate(paths) if p is None or p not in importances]
    items, paths = [items[i] for i in keep], [paths[i] for i in keep]
    given_names = None if given_names is None else [given_names[i] for i in keep]
    loaded = [load_result(x) for x in items]  # every file checked before anything is written
    names = given_names or _names(loaded, paths)
    images = _array(images, "images")
    labels = _array(labels, "labels")
    if labels is not None and not isinstance(labels, np.ndarray):
        labels = np.asarray(labels)  # N numbers, read whole
    out = Path(out)
    figs = out.parent / (out.stem + "_figures")
    figs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        if isinstance(images, NpyArray):
            # one descriptor for the whole report: a file renamed over meanwhile is read as
            # it was, one cut short gives a DataError
            held.enter_context(images)
        sections = [
            _section(name, stem, result, p, figs, images, labels, components, spatial_shape)
            for name, stem, result, p in zip(names, file_stems(names), loaded, paths, strict=True)
        ]
    named = [p if p is not None else Path(f"(in memory {i})") for i, p in enumerate(paths)]
    sections += importance_sections(importances, sections, named, figs)
    if settings is None:
        settings = {"results": [str(p) if p is not None else "(in memory)" for p in paths]}
    path = write_report(
        out, title=title, settings=settings, layers=sections, figures=overview, notes=notes
    )
    return BuiltReport(path=path, figures_dir=figs, sections=[s.name for s in sections])
