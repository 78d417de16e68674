"""One self-contained HTML report: settings, layers, components, figures and their tables.

The file references nothing outside itself: figures are embedded (base64 PNG
or inline SVG), styles are inline, there is no script, and a
Content-Security-Policy forbids every fetch but ``data:`` images, so the
report opens the same offline, from an e-mail or from an archive.

Navigation: a table of contents links every layer and each of its
components; each layer starts with a table of its components (linking to
them); each component links back to its layer and to its neighbours; any
table column named ``component`` (inside a layer) or ``layer`` links to the
matching section.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import FileFormatError, InvalidArgumentError, InvalidTypeError, MissingInputError
from ._common import json_safe, write_file
from .figures import FigureOutput

__all__ = ["LayerSection", "write_report"]

#: Tables with more rows than this start folded.
OPEN_TABLE_ROWS = 25

#: How an undefined number (NaN) is shown, and the footnote under a table that has one.
NAN_MARK = "\u2013"
_NAN_NOTE = (
    f'<p class="note">{NAN_MARK} : not defined (NaN), e.g. stability with a single replicate, '
    "or core consistency at a rank the data cannot identify.</p>"
)

#: What the report's numbers mean; shown once, linked from the contents.
DEFINITIONS = (
    (
        "fit",
        "1 - ||X - X_hat|| / ||X||: how much of the data's norm the model reproduces, from 0 "
        "(nothing) to 1 (exactly). It grows with the rank.",
    ),
    (
        "explained variance",
        "1 - ||X - X_hat||^2 / ||X||^2: the share of the data's (uncentered) sum of squares "
        "the model accounts for; one minus the squared relative error, so at least the fit.",
    ),
    (
        "core consistency (CORCONDIA)",
        "How close the best unconstrained core for the model's factors is to the "
        "superdiagonal core a CP model assumes: 100 means a valid trilinear structure; it "
        "falls, without bound, as components start to model noise or each other. Figures and "
        "the core_consistency column clip it to 0-100 (below 0 means no trilinear structure "
        "at all); the raw value is in the corcondia column. NaN at ranks above what the "
        "samples can identify.",
    ),
    (
        "stability",
        "Among the replicates (random starts) of a rank whose fit is within 0.001 of the "
        "best, the mean factor match score of each against the best one (1 = they find the "
        "same components, up to order and scale). NaN with fewer than two such replicates; "
        "'reached best' is the share of replicates that qualify.",
    ),
    (
        "degeneracy",
        "The most negative congruence between two components (near -1: two components "
        "cancel each other, a sign of a rank too high).",
    ),
)

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 0 24px 48px; color: #1f2328; background: #fff;
       line-height: 1.45; }
h1 { margin-top: 24px; } h2 { border-bottom: 2px solid #d0d7de; padding-bottom: 4px; }
section { margin-top: 28px; }
section.component { border-left: 4px solid #d0d7de; padding-left: 16px; }
nav.crumbs { font-size: 0.9em; color: #57606a; margin-bottom: 8px; }
nav.toc ul { padding-left: 20px; } nav.toc li { margin: 3px 0; }
nav.toc .comps a { margin-right: 6px; font-size: 0.9em; }
a { color: #0969da; text-decoration: none; } a:hover { text-decoration: underline; }
figure { margin: 12px 0; } figure img, figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 0.92em; color: #3d444d; margin-top: 4px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 6px 0 14px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; }
th { background: #f6f8fa; text-align: left; } td.num { text-align: right;
     font-variant-numeric: tabular-nums; }
table.kv th { width: 16em; } pre { margin: 0; white-space: pre-wrap; font-size: 0.95em; }
div.scroll { overflow-x: auto; max-width: 100%; }
details { margin: 4px 0 12px; } summary { cursor: pointer; color: #57606a; }
h4 { margin: 8px 0 2px; font-size: 0.95em; }
p.note { font-size: 0.85em; color: #57606a; margin: -8px 0 12px; }
dl.defs dt { font-weight: bold; margin-top: 6px; } dl.defs dd { margin-left: 18px; }
footer { margin-top: 40px; font-size: 0.85em; color: #57606a; }
"""


@dataclass
class LayerSection:
    """What the report shows for one layer.

    Attributes
    ----------
    name : str
        The layer's name (e.g. ``"layer3"``).
    summary : dict
        Key facts shown first (shape, chosen rank, fit, ...).
    figures : list
        Layer-wide figures (rank sweep, classes x components): each a
        :class:`~peekcore.report.figures.FigureOutput`, a dict with its fields
        (``title``, ``png`` and/or ``svg``, ``tables``, ``caption``), or the
        path of a PNG or SVG file.
    components : list
        One figure per component (:func:`~peekcore.report.figures.component_figure`),
        each given its own section and anchor.
    tables : dict of str to list of dict
        Further tables (rows as dicts).
    notes : str
        A paragraph of plain text.
    """

    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    figures: list[Any] = field(default_factory=list)
    components: list[Any] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    notes: str = ""


@dataclass
class _Fig:
    title: str
    png: Path | None
    svg: Path | None
    tables: dict[str, list[dict]]
    caption: str = ""
    component: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- inputs


def _as_fig(obj: Any) -> _Fig:
    if isinstance(obj, FigureOutput):
        return _Fig(obj.title, obj.png, obj.svg, obj.tables, obj.caption, obj.component, obj.stats)
    if isinstance(obj, str | os.PathLike):
        p = Path(obj)
        suffix = p.suffix.lower()
        if suffix not in (".png", ".svg"):
            raise InvalidArgumentError(f"figure file {p} is not a .png or .svg")
        return _Fig(p.stem, p if suffix == ".png" else None, p if suffix == ".svg" else None, {})
    if isinstance(obj, Mapping):
        if "png" not in obj and "svg" not in obj:
            raise InvalidArgumentError(
                f"figure {dict(obj)!r} gives neither 'png' nor 'svg': give a file"
            )
        png, svg = obj.get("png"), obj.get("svg")
        return _Fig(
            str(obj.get("title", Path(png or svg).stem)),
            Path(png) if png else None,
            Path(svg) if svg else None,
            dict(obj.get("tables", {})),
            str(obj.get("caption", "")),
            obj.get("component"),
            dict(obj.get("stats", {})),
        )
    raise InvalidTypeError(
        f"a figure must be a FigureOutput, a dict with 'png'/'svg', or a file path; got "
        f"{type(obj).__name__}"
    )


def _as_layer(obj: Any) -> LayerSection:
    if isinstance(obj, LayerSection):
        return obj
    if isinstance(obj, Mapping):
        unknown = set(obj) - {"name", "summary", "figures", "components", "tables", "notes"}
        if "name" not in obj or unknown:
            raise InvalidArgumentError(
                "a layer section needs 'name' and may have 'summary', 'figures', 'components', "
                f"'tables', 'notes'; got keys {sorted(obj)}"
            )
        return LayerSection(**obj)
    raise InvalidTypeError(f"a layer must be a LayerSection or a dict, got {type(obj).__name__}")


# ---------------------------------------------------------------------- rendering


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "layer"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def _cell(value: Any, link: str | None = None) -> str:
    cls = ""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif value is None:
        text = ""
    elif isinstance(value, float) and math.isnan(value):
        text, cls = NAN_MARK, ' class="num nan" title="not defined (NaN)"'
    elif isinstance(value, float):
        text = f"{value:.4g}" if math.isfinite(value) else str(value)
        cls = ' class="num"'
    elif isinstance(value, int):
        text, cls = str(value), ' class="num"'
    elif isinstance(value, Mapping | list | tuple):
        text = json.dumps(json_safe(value), default=str)
    else:
        try:  # numpy scalars
            return _cell(value.item(), link)
        except AttributeError:
            text = str(value)
    body = _e(text)
    if link is not None:
        body = f'<a href="#{_e(link)}">{body}</a>'
    return f"<td{cls}>{body}</td>"


def _table(rows: Sequence[Mapping], links: Mapping[str, Mapping[Any, str]] | None = None) -> str:
    """An HTML table: the union of the rows' keys as columns; ``links[column][value]`` anchors."""
    if not rows:
        return "<p><em>(empty table)</em></p>"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    links = links or {}
    out = ['<div class="scroll"><table><thead><tr>']
    out += [f"<th>{_e(c)}</th>" for c in columns]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for c in columns:
            v = row.get(c)
            target = None
            if c in links:
                try:
                    target = links[c].get(v.item() if hasattr(v, "item") else v)
                except TypeError:  # unhashable
                    target = None
            out.append(_cell(v, target))
        out.append("</tr>")
    out.append("</tbody></table></div>")
    if any(_is_nan(row.get(c)) for row in rows for c in columns):
        out.append(_NAN_NOTE)
    return "".join(out)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _plain_list(values: Sequence[Any]) -> str | None:
    """A short list of scalars as ``a, b, c`` (None when it holds containers)."""
    if any(isinstance(v, Mapping | list | tuple) for v in values):
        return None
    return ", ".join(NAN_MARK if _is_nan(v) else str(v) for v in json_safe(list(values)))


def _kv_table(d: Mapping[str, Any], depth: int = 0) -> str:
    """Keys and values as a two-column table: nested dicts as nested tables, lists as text."""
    if not d:
        return "<p><em>(none)</em></p>"
    out = ['<div class="scroll"><table class="kv"><tbody>']
    for k, v in d.items():
        label = _e(str(k).replace("_", " "))
        if isinstance(v, Mapping) and depth < 3:
            out.append(f"<tr><th>{label}</th><td>{_kv_table(v, depth + 1)}</td></tr>")
        elif isinstance(v, list | tuple) and _plain_list(v) is not None:
            out.append(f"<tr><th>{label}</th><td>{_e(_plain_list(v))}</td></tr>")
        elif isinstance(v, Mapping | list | tuple):
            text = json.dumps(json_safe(v), indent=1, default=str)
            out.append(f"<tr><th>{label}</th><td><pre>{_e(text)}</pre></td></tr>")
        else:
            out.append(f"<tr><th>{label}</th>{_cell(v)}</tr>")
    out.append("</tbody></table></div>")
    if any(_is_nan(v) for v in d.values()):
        out.append(_NAN_NOTE)
    return "".join(out)


def _tables_block(tables: Mapping[str, Sequence[Mapping]], links: Mapping | None) -> str:
    out = []
    for name, rows in tables.items():
        rows = list(rows)
        is_open = " open" if len(rows) <= OPEN_TABLE_ROWS else ""
        out.append(
            f'<details class="table"{is_open}><summary>Table: {_e(name)} ({len(rows)} '
            f"row{'s' if len(rows) != 1 else ''})</summary><h4>{_e(name)}</h4>"
            f"{_table(rows, links)}</details>"
        )
    return "".join(out)


def _inline_svg(path: Path, prefix: str) -> str:
    """An SVG file's ``<svg>`` element with its ids made unique within the page."""
    text = path.read_text(encoding="utf-8")
    start = text.find("<svg")
    if start < 0:
        raise FileFormatError(f"{path} holds no <svg> element")
    text = text[start:]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(
        r'(\b(?:xlink:)?href)="#([^"]+)"', lambda m: f'{m.group(1)}="#{prefix}{m.group(2)}"', text
    )
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", text)
    return text


def _figure(fig: _Fig, fmt: str, fig_id: str, links: Mapping | None) -> str:
    png = fig.png if fig.png is not None and fig.png.exists() else None
    svg = fig.svg if fig.svg is not None and fig.svg.exists() else None
    if png is None and svg is None:
        raise MissingInputError(
            f"figure {fig.title!r}: neither {fig.png} nor {fig.svg} exists; write the figures "
            "before the report"
        )
    if (fmt == "svg" and svg is not None) or png is None:
        body = f'<div class="svg">{_inline_svg(svg, fig_id + "-")}</div>'
    else:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        body = f'<img alt="{_e(fig.title)}" src="data:image/png;base64,{data}">'
    caption = f"<strong>{_e(fig.title)}</strong>"
    if fig.caption:
        caption += f" {_e(fig.caption)}"
    return (
        f'<figure id="{_e(fig_id)}">{body}<figcaption>{caption}</figcaption></figure>'
        + _tables_block(fig.tables, links)
    )


def _component_index(comps: list[_Fig], anchors: list[str]) -> str:
    rows = []
    for fig, anchor in zip(comps, anchors, strict=True):
        stats = fig.stats
        tops = [row.get("sample") for row in fig.tables.get("top_samples", [])[:5]]
        chans = [row.get("channel") for row in fig.tables.get("top_channels", [])[:5]]
        rows.append(
            f'<tr><td class="num"><a href="#{_e(anchor)}">{_e(fig.component)}</a></td>'
            f"{_cell(stats.get('weight'))}<td>{_e(', '.join(map(str, tops)))}</td>"
            f"<td>{_e(', '.join(map(str, chans)))}</td>"
            f"<td>{_e(stats.get('peak_yx', ''))}</td></tr>"
        )
    return (
        '<div class="scroll"><table><thead><tr><th>component</th><th>weight</th>'
        "<th>top samples</th><th>top channels</th><th>spatial peak (y, x)</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _head(title: str) -> str:
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<link rel="icon" href="data:,">',
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
            f'<h1 id="top">{_e(title)}</h1>',
        ]
    )


def _definitions() -> str:
    items = "".join(f"<dt>{_e(term)}</dt><dd>{_e(text)}</dd>" for term, text in DEFINITIONS)
    return f'<section id="definitions"><h2>Definitions</h2><dl class="defs">{items}</dl></section>'


def _toc(
    sections: list[LayerSection],
    slugs: list[str],
    comp_figs: list[list[_Fig]],
    comp_anchors: list[list[str]],
    overview: bool,
) -> str:
    toc = [
        '<nav class="toc"><h2>Contents</h2><ul><li><a href="#settings">Settings</a></li>',
        '<li><a href="#definitions">Definitions</a></li>',
    ]
    if overview:
        toc.append('<li><a href="#overview">Across layers</a></li>')
    if sections:
        toc.append('<li><a href="#layers">Layers</a><ul>')
        for s, slug, figs, anchors in zip(sections, slugs, comp_figs, comp_anchors, strict=True):
            comps = "".join(
                f'<a href="#{_e(a)}">{_e(f.component)}</a>'
                for f, a in zip(figs, anchors, strict=True)
            )
            extra = f' <span class="comps">components: {comps}</span>' if comps else ""
            toc.append(f'<li><a href="#{_e(slug)}">{_e(s.name)}</a>{extra}</li>')
        toc.append("</ul></li>")
    toc.append("</ul></nav>")
    return "".join(toc)


def _layer_html(
    sections: list[LayerSection],
    slugs: list[str],
    j: int,
    figs: list[_Fig],
    anchors: list[str],
    figure_format: str,
    taken: set[str],
) -> str:
    """Section ``j``: its summary, figures, tables, component index and components."""
    s, slug = sections[j], slugs[j]
    comp_links = {"component": {f.component: a for f, a in zip(figs, anchors, strict=True)}}
    crumbs = ['<a href="#top">contents</a>']
    if j > 0:
        crumbs.append(
            f'<a href="#{_e(slugs[j - 1])}">previous layer: {_e(sections[j - 1].name)}</a>'
        )
    if j + 1 < len(sections):
        crumbs.append(f'<a href="#{_e(slugs[j + 1])}">next layer: {_e(sections[j + 1].name)}</a>')
    parts = [
        f'<section class="layer" id="{_e(slug)}"><h2>Layer {_e(s.name)}</h2>'
        f'<nav class="crumbs">{" · ".join(crumbs)}</nav>'
    ]
    if s.summary:
        parts.append(_kv_table(s.summary))
    if s.notes:
        parts.append(f"<p>{_e(s.notes)}</p>")
    for i, fig in enumerate(s.figures):
        fig_id = _slug(f"{slug}-fig-{i}", taken)
        parts.append(_figure(_as_fig(fig), figure_format, fig_id, comp_links))
    if s.tables:
        parts.append(_tables_block(s.tables, comp_links))
    if figs:
        parts.append(f"<h3>Components of {_e(s.name)}</h3>{_component_index(figs, anchors)}")
    for i, (fig, anchor) in enumerate(zip(figs, anchors, strict=True)):
        nav = [f'<a href="#{_e(slug)}">layer {_e(s.name)}</a>']
        if i > 0:
            nav.append(f'<a href="#{_e(anchors[i - 1])}">previous component</a>')
        if i + 1 < len(figs):
            nav.append(f'<a href="#{_e(anchors[i + 1])}">next component</a>')
        body = _figure(fig, figure_format, _slug(f"{anchor}-fig", taken), comp_links)
        parts.append(
            f'<section class="component" id="{_e(anchor)}">'
            f"<h3>{_e(s.name)}: component {_e(fig.component)}</h3>"
            f'<nav class="crumbs">{" · ".join(nav)}</nav>{body}</section>'
        )
    parts.append("</section>")
    return "".join(parts)


def write_report(
    path: str | os.PathLike,
    *,
    title: str,
    settings: Mapping[str, Any],
    layers: Sequence[LayerSection | Mapping[str, Any]],
    figures: Sequence[Any] = (),
    notes: str = "",
    figure_format: str = "png",
) -> Path:
    """Write one self-contained HTML report.

    Parameters
    ----------
    path : path-like
        The ``.html`` file to write (atomically; its folder is created).
    title : str
    settings : dict
        The run's settings (data, layers, ranks, solver options, versions), shown
        as a table; nested values are shown as JSON.
    layers : list of LayerSection or dict
        One section per layer, in order (see :class:`LayerSection`; a dict takes
        the same keys). Give distinct names: the layer table links each name
        to its section (anchors stay unique either way).
    figures : list, optional
        Figures across layers (e.g. the training-quality figure), shown in an
        overview before the layers; same forms as ``LayerSection.figures``.
    notes : str
        A paragraph of plain text under the title.
    figure_format : {"png", "svg"}
        Embed each figure as a base64 PNG ``<img>`` (default, compact for
        images) or as inline SVG (ids made unique per figure). The other format
        is used when a figure has only one.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    if figure_format not in ("png", "svg"):
        raise InvalidArgumentError(f"figure_format must be 'png' or 'svg', got {figure_format!r}")
    if not isinstance(settings, Mapping):
        raise InvalidTypeError(f"settings must be a dict, got {type(settings).__name__}")
    sections = [_as_layer(x) for x in layers]
    overview = [_as_fig(f) for f in figures]
    taken: set[str] = {"top", "settings", "definitions", "overview", "layers"}
    slugs = [_slug(f"layer-{s.name}", taken) for s in sections]
    layer_links = {s.name: slug for s, slug in zip(sections, slugs, strict=True)}
    comp_figs = [[_as_fig(c) for c in s.components] for s in sections]
    for figs in comp_figs:
        for i, f in enumerate(figs):
            if f.component is None:
                f.component = i
    comp_anchors = [
        [_slug(f"{slug}-component-{f.component}", taken) for f in figs]
        for slug, figs in zip(slugs, comp_figs, strict=True)
    ]

    parts = [_head(title)]
    if notes:
        parts.append(f"<p>{_e(notes)}</p>")
    parts.append(_toc(sections, slugs, comp_figs, comp_anchors, bool(overview)))
    parts.append(
        f'<section id="settings"><h2>Settings</h2>{_kv_table(settings)}</section>{_definitions()}'
    )
    if overview:
        parts.append('<section id="overview"><h2>Across layers</h2>')
        for i, fig in enumerate(overview):
            fig_id = _slug(f"overview-fig-{i}", taken)
            parts.append(_figure(fig, figure_format, fig_id, {"layer": layer_links}))
        parts.append("</section>")
    if sections:
        rows = [{"layer": s.name, **s.summary} for s in sections]
        parts.append(
            '<section id="layers"><h2>Layers</h2>'
            + _table(rows, {"layer": layer_links})
            + "</section>"
        )
    for j in range(len(sections)):
        parts.append(
            _layer_html(sections, slugs, j, comp_figs[j], comp_anchors[j], figure_format, taken)
        )
    parts.append(f"<footer>Written by peekcore {_e(__version__)}.</footer></body></html>")
    doc = "\n".join(parts).encode("utf-8")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return write_file(dest, lambda fh: fh.write(doc))
