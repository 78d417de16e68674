"""Where chunks come from: the chunk-source protocol and its array sources.

The chunk-source protocol
-------------------------
Every solver in peekcore reads its data through one small protocol, so that
arrays in memory, memory-mapped files, activation stores and live models are
interchangeable. A chunk source is any object with:

``shape``
    ``tuple[int, ...]`` of length >= 3. Mode 0 is the sample mode (images,
    tokens); the other modes (channels, space, ...) are the *resident* modes.
``dtype``
    The stored element type as a string: ``"float16"``, ``"bfloat16"``,
    ``"float32"`` or ``"float64"`` (a numpy or torch dtype is accepted too).
``chunks(chunk_size)``
    Returns a fresh iterator over consecutive slices along mode 0, each an
    array of shape ``(b, *shape[1:])`` (numpy, torch or anything
    ``numpy.asarray`` accepts), together covering samples ``0 .. shape[0]-1``
    in order. ``chunk_size`` is a hint in samples; a source may yield other
    sizes. It must be callable any number of times and yield the same values
    each time: one call is one pass.

Optional: ``chunk_size`` (int), the source's own chunk in samples (an
activation store's stored chunks). Without a chunk size from the user, the
solvers then ask for a multiple of it, so that reads stay whole chunks.

Results do not depend on how a source chunks its data, beyond rounding.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ._validate import SUPPORTED_DTYPES, dtype_label, dtype_name
from .errors import FileFormatError, InvalidArgumentError, InvalidTypeError, MissingInputError
from .npyfile import NpyFile, open_npy

__all__ = [
    "ChunkSource",
    "ArraySource",
    "as_source",
    "describe_source",
    "dtype_label",
    "dtype_name",
    "natural_chunk_size",
    "sample_rows",
    "SUPPORTED_DTYPES",
]


@runtime_checkable
class ChunkSource(Protocol):
    """Structural type of a chunk source (see the module docstring)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def chunks(self, chunk_size: int) -> Iterator[Any]: ...


class ArraySource:
    """A chunk source over an array held in memory or memory-mapped.

    Parameters
    ----------
    array : numpy.ndarray, numpy.memmap or torch.Tensor (CPU or GPU)
        Shape ``(N, I_1, ..., I_d)``. Chunks are views where the layout
        allows, so nothing is copied for in-memory arrays; memory-mapped
        arrays are read one chunk at a time.
    """

    def __init__(self, array: np.ndarray | torch.Tensor) -> None:
        if isinstance(array, torch.Tensor):
            self.array = array.detach()
        else:
            self.array = array
        self._dtype = dtype_name(self.array.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def device(self) -> str:
        """``"cpu"`` or the torch device string of a GPU tensor."""
        if isinstance(self.array, torch.Tensor):
            return str(self.array.device)
        return "cpu"

    def chunks(self, chunk_size: int) -> Iterator[np.ndarray | torch.Tensor]:
        n = self.shape[0]
        step = max(1, int(chunk_size))
        for start in range(0, n, step):
            yield self.array[start : start + step]

    def shard(self, lo: int, hi: int) -> ArraySource:
        """The rows ``[lo, hi)`` as a source of their own (a view, nothing copied)."""
        return ArraySource(self.array[lo:hi])

    def __repr__(self) -> str:
        kind = type(self.array).__name__
        return f"ArraySource({kind}, shape={self.shape}, dtype={self.dtype})"


def natural_chunk_size(source: Any) -> int | None:
    """The source's own chunk in samples (optional ``chunk_size`` attribute), or None."""
    n = getattr(source, "chunk_size", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None


def as_source(data: Any) -> ChunkSource:
    """Wrap user data as a chunk source.

    Parameters
    ----------
    data : array, tensor, path or chunk source
        A numpy array or memmap, a torch tensor, a path to a ``.npy`` file
        (read chunk by chunk, :class:`~peekcore.npyfile.NpyFile`), or any object that follows the
        chunk-source protocol (returned as is).

    Returns
    -------
    ChunkSource
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise MissingInputError(f"no such data file: {path}")
        if (path / "zarr.json").is_file():  # a folder of a capture, given whole
            raise InvalidArgumentError(
                f"{path} is a store of layers, not one array: pass one layer, "
                f"peekcore.ActivationStore({str(path)!r})[layer]"
            )
        if path.suffix != ".npy":
            raise FileFormatError(
                f"{path}: peekcore reads .npy files directly; for other formats load the "
                "array yourself or pass a chunk source"
            )
        opened = open_npy(path)  # read by chunks, not mapped: see peekcore.npyfile
        return opened if isinstance(opened, NpyFile) else ArraySource(opened)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        return ArraySource(data)
    if isinstance(data, ChunkSource):
        return data
    if hasattr(data, "__cuda_array_interface__") or hasattr(data, "__dlpack__"):
        try:
            return ArraySource(torch.from_dlpack(data))
        except Exception as err:  # pragma: no cover - depends on the producer
            raise InvalidTypeError(
                f"could not import {type(data).__name__} through DLPack"
            ) from err
    raise InvalidTypeError(
        f"cannot read data of type {type(data).__name__}: pass a numpy array, a torch tensor, "
        "a .npy path, or an object with shape, dtype and chunks(chunk_size) "
        "(see peekcore.sources)"
    )


def describe_source(data: Any) -> dict[str, Any]:
    """Where data came from, for result files to record (and reports to name sections by).

    Parameters
    ----------
    data : any
        What a fit or sweep was given: a ``.npy`` path, an array or tensor, a
        stored layer (``store["layer3"]``) or another chunk source. A chunk
        source may describe itself with a ``source_info`` dict attribute.

    Returns
    -------
    dict
        ``{"store": path, "layer": name, "layout": [dims]}`` for a stored layer,
        ``{"file": path}`` for a ``.npy`` path, ``{"array": "numpy float32"}``
        for data in memory; plain strings and lists only (JSON-safe).
    """
    if isinstance(data, (str, os.PathLike)):
        return {"file": str(Path(data).resolve())}
    info = getattr(data, "source_info", None)
    if isinstance(info, dict):
        return dict(info)
    store = getattr(data, "store", None)
    if store is not None and hasattr(store, "path") and hasattr(data, "name"):
        return {
            "store": str(Path(store.path).resolve()),
            "layer": str(data.name),
            "layout": [str(d) for d in getattr(data, "dims", ())],
        }
    if isinstance(data, np.ndarray):
        kind = "numpy memmap" if isinstance(data, np.memmap) else "numpy array"
        filename = getattr(data, "filename", None)
        return {"file": str(filename)} if filename else {"array": f"{kind} {data.dtype}"}
    if isinstance(data, torch.Tensor):
        return {"array": f"torch tensor {str(data.dtype).removeprefix('torch.')} {data.device}"}
    return {"array": type(data).__name__}


#: samples read at each of the first, middle and last positions by :func:`sample_rows`
SAMPLED_ROWS = 4


def _first_rows(source: Any, k: int) -> Any:
    """The first ``k`` samples of a pass over ``source`` (the pass stopped there), or None."""
    chunks = source.chunks(k)
    try:
        first = next(iter(chunks))
    except StopIteration:
        return None
    finally:
        getattr(chunks, "close", lambda: None)()
    return first[:k]


def sample_rows(source: Any, k: int = SAMPLED_ROWS) -> list[Any]:
    """A few samples of a source, cheaply: its first, middle and last ``k``.

    Sources that can cut out rows (``shard(lo, hi)``: arrays, ``.npy`` files,
    stored layers) give the three blocks; others only their first ``k``
    samples (the first chunk of a pass, stopped there). The same data gives
    the same blocks whichever of these sources holds it.

    Returns
    -------
    list of array or tensor
        Blocks of shape ``(b, *shape[1:])`` in the stored dtype.
    """
    n = int(source.shape[0])
    k = min(n, k)
    if hasattr(source, "shard"):
        blocks = [
            _first_rows(source.shard(lo, lo + k), k) for lo in sorted({0, (n - k) // 2, n - k})
        ]
    else:
        blocks = [_first_rows(source, k)]
    return [b for b in blocks if b is not None]
