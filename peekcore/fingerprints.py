"""Fingerprints of capture inputs: what a resumed capture compares with the store.

A store records hashes of the data it was captured from; a resumed capture
recomputes them and refuses other data. This module computes them:

- :func:`array_fingerprint`: an array's inputs and labels (whole, or 64
  spread rows above 16 MiB), with its shape and dtype;
- :func:`described_fingerprint`: a torch data set by description (class,
  length, transform, an ``ImageFolder``'s file list);
- :func:`content_fingerprint`: the model inputs and the labels of a map-style
  data set's first ``n`` items, the same whatever form they come in;
- :func:`changing_item`: an item that reads differently twice (a random
  augmentation, which no resume can reproduce);
- :func:`describe_callable`: a transform's description, the same in every
  process.

:class:`peekcore.datasets.Inputs` exposes them as attributes and methods.
"""

from __future__ import annotations

import hashlib
import re
import types
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ._validate import numeric_labels
from .errors import InvalidTypeError

__all__ = [
    "Content",
    "array_fingerprint",
    "changing_item",
    "content_fingerprint",
    "describe_callable",
    "described_fingerprint",
    "strip_addresses",
    "transform_repr",
]

_HASH_FULL_BYTES = 16 << 20  # arrays up to this size are hashed whole; larger: 64 rows


def array_fingerprint(inputs: Any, labels: Any) -> str:
    """A hash of an array's inputs and labels (whole, or sampled rows for large arrays).

    Parameters
    ----------
    inputs : numpy.ndarray, torch.Tensor or peekcore.npyfile.NpyArray
        Shape ``(N, ...)``.
    labels : numpy.ndarray or None
        Shape ``(N, ...)``.

    Returns
    -------
    str
        SHA-256 hex digest of the shape, dtype and values.
    """
    h = hashlib.sha256()
    h.update(repr((tuple(inputs.shape), str(inputs.dtype))).encode())
    _hash_rows(h, inputs)
    if labels is not None:
        _hash_rows(h, labels)
    return h.hexdigest()


def _hash_rows(h: Any, arr: Any) -> None:
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu()
        if arr.dtype == torch.bfloat16:
            arr = arr.view(torch.int16)
        arr = arr.numpy()
    n = int(arr.shape[0])
    if arr.nbytes <= _HASH_FULL_BYTES:
        h.update(np.ascontiguousarray(arr).tobytes())
        return
    for i in np.unique(np.linspace(0, n - 1, 64).astype(np.int64)):
        h.update(np.ascontiguousarray(arr[int(i)]).tobytes())


def described_fingerprint(description: str, ds: Any) -> str:
    """A torch data set identified by ``description``, its transform and its file list.

    Only an ``ImageFolder``'s ``samples`` (path, class) pairs are hashed; other
    data sets are known by description alone (:func:`content_fingerprint`
    reads their items).
    """
    parts = [description, transform_repr(getattr(ds, "transform", None)) or ""]
    samples = getattr(ds, "samples", None)  # ImageFolder: (path, class) pairs
    if isinstance(samples, list):
        h = hashlib.sha256()
        for item in samples:
            h.update(repr(item).encode())
        parts.append(h.hexdigest())
    return "|".join(parts)


class Content(NamedTuple):
    """The content fingerprints of a data set's items: model inputs, labels (or None)."""

    inputs: str
    labels: str | None


def content_fingerprint(
    ds: Dataset,
    n: int,
    rows: tuple[Any, Any] | None = None,
    transform: Any = None,
) -> Content:
    """The content fingerprints of the first ``n`` items of a map-style data set.

    One read of each item hashed (all, or 64 spread ones above 16 MiB) feeds
    both. The inputs' hash does not depend on the form they come in (see
    :attr:`peekcore.datasets.Inputs.inputs_fingerprint`).

    Parameters
    ----------
    ds : torch.utils.data.Dataset
        Read by index, ``ds[i]``, unless ``rows`` is given.
    n : int
        Number of items to cover, ``1 <= n <= len(ds)``.
    rows : tuple, optional
        ``(inputs (N, ...), labels (N, ...) or None)`` of an array data set:
        read by row, without its transform.
    transform : callable, optional
        The array data set's per-row transform, named in the inputs' hash.

    Returns
    -------
    Content
    """
    arrays, labels = (None, None) if rows is None else rows

    def read(i: int) -> tuple[np.ndarray, str, Any]:
        if arrays is None:
            return _read_item(ds, i)
        return (*_input_row(arrays[i]), None if labels is None else labels[i])

    first = read(0)
    shape, dtype = first[0].shape, first[1]
    whole = n * first[0].nbytes <= _HASH_FULL_BYTES
    h, hl = hashlib.sha256(), hashlib.sha256()
    h.update(repr(("model inputs", n, shape, dtype)).encode())
    has_labels = first[2] is not None
    if arrays is not None and whole:  # one read: the same bytes as the rows in order
        h.update(_input_row(arrays[:n])[0].tobytes())
        if has_labels:
            hl.update(np.ascontiguousarray(labels[:n]).tobytes())
    else:
        picked = range(n) if whole else np.unique(np.linspace(0, n - 1, 64).astype(np.int64))
        for i in picked:
            values, kind, label = first if i == 0 else read(int(i))
            if values.shape != shape or kind != dtype:  # ragged items: say so
                h.update(repr((int(i), values.shape, kind)).encode())
            h.update(values.tobytes())
            if label is not None:
                has_labels = True
                hl.update(_label_bytes(label))
    digest = h.hexdigest()
    if transform is not None:
        digest += f"|transform={describe_callable(transform)}"
    return Content(digest, hl.hexdigest() if has_labels else None)


def changing_item(ds: Dataset, n: int, probes: int = 8) -> int | None:
    """The first of ``probes`` items spread over ``ds[0:n]`` that reads differently twice.

    Each is read twice (``ds[i]``) and compared bit for bit, input and label:
    a random augmentation shows here.

    Returns
    -------
    int or None
        The index of the first item whose two reads differ; ``None`` when all agree.
    """
    for i in np.unique(np.linspace(0, n - 1, probes).astype(np.int64)):
        first, again = _read_item(ds, int(i)), _read_item(ds, int(i))
        if _item_bytes(first) != _item_bytes(again):
            return int(i)
    return None


def _read_item(ds: Dataset, i: int) -> tuple[np.ndarray, str, Any]:
    """Item ``i`` of a data set: its input's values and dtype name, and its label (or None)."""
    item = ds[i]
    label = None
    if isinstance(item, (tuple, list)) and len(item) > 1:
        label = item[1]
    return (*_input_row(item), label)


def _label_bytes(label: Any) -> bytes:
    """A label's bytes as a capture stores it (int64 or float64); others by their repr."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    arr = np.asarray(label)
    if arr.dtype.kind in "biuf":
        return np.ascontiguousarray(numeric_labels(arr)).tobytes()
    return strip_addresses(repr(label)).encode()


def _item_bytes(read: tuple[np.ndarray, str, Any]) -> tuple:
    """What two reads of an item must agree on: input shape, dtype and bits, label bits."""
    values, kind, label = read
    return values.shape, kind, values.tobytes(), None if label is None else _label_bytes(label)


def _input_row(item: Any) -> tuple[np.ndarray, str]:
    """The model input of a data set item (alone, or first in a tuple), and its dtype's name.

    The values come back C-ordered in native byte order; the name is the same
    for numpy and torch (``"float32"``), and a tensor's ``bfloat16`` (no numpy
    dtype) is read as its 16-bit pattern under the name ``"bfloat16"``.
    """
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    name = None
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        if item.dtype == torch.bfloat16:
            item, name = item.view(torch.int16), "bfloat16"
        item = item.numpy()
    arr = np.asarray(item)
    if arr.dtype.kind not in "biufc":
        raise InvalidTypeError(
            f"a data item is a {type(item).__name__}; peekcore expects an input tensor or array, "
            "alone or first in a tuple (input, label, ...): make the Dataset return that"
        )
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    return arr, name or arr.dtype.name


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def strip_addresses(text: str) -> str:
    """``text`` (a ``repr``) without the memory addresses (`` at 0x7f...``) in it."""
    return _ADDRESS.sub("", text)


def describe_callable(fn: Any) -> str:
    """A description of a function or callable that is the same in every process.

    Functions (and builtins) are named by module and qualified name, bound
    methods by that and their object; other callables by their ``repr``
    without memory addresses (``<function f at 0x7f...>`` -> ``<function f>``),
    which a plain ``repr`` would change from run to run. A Python function's
    name is followed by a digest of what it computes (its code, constants,
    defaults and the values it closes over), since two lambdas of one module,
    or two closures of one factory, share a name.
    """
    if isinstance(fn, types.MethodType):
        return f"{describe_callable(fn.__func__)} of {strip_addresses(repr(fn.__self__))}"
    if isinstance(fn, types.FunctionType):
        return f"{_callable_name(fn)} [{_code_digest(fn)}]"
    if isinstance(fn, types.BuiltinFunctionType):
        return _callable_name(fn)
    return strip_addresses(repr(fn))


def _code_digest(fn: types.FunctionType) -> str:
    """12 hex digits of a function's code, constants, defaults and closure values."""

    def code_parts(code: types.CodeType) -> list[Any]:
        consts = [code_parts(c) if isinstance(c, types.CodeType) else c for c in code.co_consts]
        return [code.co_code, consts, code.co_names]

    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # an empty cell
            cells.append(None)
    parts = [code_parts(fn.__code__), fn.__defaults__, fn.__kwdefaults__, cells]
    return hashlib.sha256(strip_addresses(repr(parts)).encode()).hexdigest()[:12]


def _callable_name(fn: Any) -> str:
    """Module and qualified name of a function or builtin."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    module = getattr(fn, "__module__", None)
    if module is None and isinstance(getattr(fn, "__self__", None), types.ModuleType):
        module = fn.__self__.__name__
    return f"{module}.{name}" if module else strip_addresses(name)


def transform_repr(transform: Any) -> str | None:
    """:func:`describe_callable` of a transform, or None for none."""
    return None if transform is None else describe_callable(transform)
