"""Pictures, a self-contained HTML report, and exports of fitted results.

Everything here starts from result objects or the files they were saved to
(``CPModel.save``, ``RankSweep.save``), never from live solver state:

- :mod:`~peekcore.report.figures`: rank sweep, per-component, classes x
  components and training-quality figures, each written as PNG and SVG;
- :mod:`~peekcore.report.assemble`: :func:`build_report`, a whole report from
  result files (what ``peek report`` and the demo call);
- :mod:`~peekcore.report.html`: one HTML file embedding the figures and the
  tables behind them, with links between layers and components;
- :mod:`~peekcore.report.export`: plain npz, xarray Dataset (zarr or netCDF),
  TensorLy ``CPTensor`` and a JSON summary.

Matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

from ._common import load_model, load_result, load_sweep
from .assemble import BuiltReport, build_report
from .export import (
    from_npz,
    load_xarray,
    save_xarray,
    summary_json,
    to_npz,
    to_tensorly,
    to_xarray,
)
from .figures import (
    FigureOutput,
    class_component_figure,
    component_figure,
    component_figures,
)
from .html import LayerSection, write_report
from .quality_figure import training_quality_figure
from .sweep_figure import rank_sweep_figure

__all__ = [
    "BuiltReport",
    "build_report",
    "FigureOutput",
    "LayerSection",
    "class_component_figure",
    "component_figure",
    "component_figures",
    "from_npz",
    "load_model",
    "load_result",
    "load_sweep",
    "load_xarray",
    "rank_sweep_figure",
    "save_xarray",
    "summary_json",
    "to_npz",
    "to_tensorly",
    "to_xarray",
    "training_quality_figure",
    "write_report",
]
