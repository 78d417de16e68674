"""What the ``peek`` commands print: aligned text for people, strict JSON for programs.

A command returns a plain dict; :func:`format_human` lays it out as
``key: value`` lines, nested dicts indented under their key, lists of rows
(a sweep's table) as aligned columns, numbers rounded for reading and NaN as
``-`` with one footnote saying what it means. :func:`dumps_json` writes the
same dict as one strict JSON document (NaN and infinities become ``null``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["dumps_json", "json_safe", "format_human", "format_number", "format_table", "NAN_MARK"]

#: How a missing or undefined number is shown.
NAN_MARK = "-"
NAN_FOOTNOTE = (
    f"{NAN_MARK} : not defined here (NaN), e.g. stability with a single replicate, or "
    "core consistency at a rank the data cannot identify"
)

#: Lists longer than this are shown by their first items and a count.
_MAX_LIST = 8


def dumps_json(obj: Any) -> str:
    """``obj`` as one strict JSON document (NaN and inf as null, numpy made plain)."""
    return json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False)


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays made plain, NaN and inf made None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _is_nan(value: Any) -> bool:
    return isinstance(value, float | np.floating) and math.isnan(value)


def format_number(value: Any, digits: int = 4) -> str:
    """A number rounded for reading: ``0.9667``, ``12.3``, ``1.2e-05``; NaN as ``-``.

    Integers and booleans are shown as they are; floats with ``digits``
    significant digits (so a fit of 0.96671234 reads 0.9667).
    """
    if value is None:
        return NAN_MARK
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value):
            return NAN_MARK
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        if 1e-3 <= abs(value) < 1e6:
            return f"{value:#.{digits}g}" if abs(value) < 1 else _fixed(value, digits)
        return f"{value:.{max(digits - 2, 1)}e}"
    return str(value)


def _fixed(value: float, digits: int) -> str:
    """``value`` >= 1 with ``digits`` significant digits and no exponent (1234.5 -> 1235)."""
    whole = len(str(int(abs(value))))
    return f"{value:.{max(digits - whole, 0)}f}"


def format_table(rows: Sequence[Mapping[str, Any]], indent: str = "") -> tuple[str, bool]:
    """Rows of dicts as aligned columns (numbers right-aligned).

    Returns
    -------
    text : str
        The header line, a rule and one line per row.
    has_nan : bool
        Whether a cell showed ``-`` for NaN (the caller adds the footnote).
    """
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[format_number(row.get(c)) for c in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(c), int | float | np.number | None) for row in rows) for c in columns
    ]
    has_nan = any(_is_nan(row.get(c)) or row.get(c) is None for row in rows for c in columns)
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return indent + "  ".join(parts).rstrip()

    out = [line(columns), indent + "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out), has_nan


def _is_rows(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(v, Mapping) for v in value)
    )


def _short_list(value: Sequence[Any]) -> str:
    shown = [format_number(v) for v in value[:_MAX_LIST]]
    more = f", ... ({len(value)} in all)" if len(value) > _MAX_LIST else ""
    return "[" + ", ".join(shown) + more + "]"


def _lines(result: Mapping[str, Any], indent: str, notes: set[str]) -> list[str]:
    """``key: value`` lines, keys aligned within one level; nested values indented."""
    width = max((len(str(k)) for k in result), default=0)
    out: list[str] = []
    for key, value in result.items():
        label = f"{indent}{str(key).replace('_', ' '):<{width}}"
        if _is_rows(value):
            table, has_nan = format_table(value, indent + "  ")
            out += [f"{label}:", table]
            if has_nan:
                notes.add(NAN_FOOTNOTE)
        elif isinstance(value, Mapping):
            out.append(f"{label}:" + ("" if value else " (none)"))
            out += _lines(value, indent + "  ", notes)
        elif isinstance(value, list | tuple | np.ndarray):
            items = list(np.asarray(value).ravel()) if isinstance(value, np.ndarray) else value
            if any(_is_nan(v) or v is None for v in items[:_MAX_LIST]):
                notes.add(NAN_FOOTNOTE)
            out.append(f"{label}: {_short_list(items)}")
        elif value is None:
            out.append(f"{label}: (none)")
        else:
            if _is_nan(value):
                notes.add(NAN_FOOTNOTE)
            out.append(f"{label}: {format_number(value)}")
    return out


def format_human(result: Mapping[str, Any]) -> str:
    """A command's result as text a person reads: aligned, rounded, NaN as ``-``.

    Any ``"notes"`` entry (a list of strings) is printed last, one per line,
    after the NaN footnote if one is needed.
    """
    result = dict(result)
    extra = list(result.pop("notes", None) or [])
    notes: set[str] = set()
    out = _lines(result, "", notes)
    tail = sorted(notes) + extra
    if tail:
        out.append("")
        out += tail
    return "\n".join(out)
