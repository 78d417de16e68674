"""The store format: dtypes on disk, where chunks live, errors, and checks of the metadata."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import (
    InvalidArgumentError,
    MissingDependencyError,
    MissingInputError,
    StoreDamageError,
    StoreError,
)
from ..sources import dtype_label

FORMAT = 1
STORE_DTYPES = ("float16", "bfloat16", "float32")
_NUMPY_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
_BF16_NAN_BITS = 0x7FC0


class _StoreChanged(StoreError):
    """The store at an open store's path is no longer the one opened (captured again, say)."""


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as err:  # pragma: no cover - zarr is a dependency
        raise MissingDependencyError(
            "activation stores need zarr 3 (which needs Python >= 3.11): `pip install 'zarr>=3'`"
        ) from err
    if int(zarr.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise MissingDependencyError(
            f"activation stores need zarr >= 3, found {zarr.__version__}: "
            "`pip install -U 'zarr>=3'` (Python >= 3.11)"
        )
    return zarr


def zarr_module() -> Any:
    """The zarr module (version 3), or an ImportError that says how to install it."""
    return _zarr()


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that holds a store dtype on disk (uint16 bits for bfloat16).

    Parameters
    ----------
    dtype : {"float16", "bfloat16", "float32"}

    Returns
    -------
    numpy.dtype
    """
    return np.dtype(_NUMPY_STORAGE[dtype])


def check_store_dtype(dtype: Any) -> str:
    """``dtype`` as one of ``STORE_DTYPES``, or a ``ValueError`` saying what is allowed.

    Parameters
    ----------
    dtype : str, numpy dtype or torch.dtype

    Returns
    -------
    str
        ``"float16"``, ``"bfloat16"`` or ``"float32"``.
    """
    name = dtype_label(dtype)
    if name not in STORE_DTYPES:
        raise InvalidArgumentError(
            f"activations are stored as float16, bfloat16 or float32; got dtype={dtype!r}"
        )
    return name


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor in a store dtype as the numpy array written to disk (no copy).

    Parameters
    ----------
    t : torch.Tensor
        ``(b, ...)`` float16, bfloat16 or float32, on the CPU.

    Returns
    -------
    numpy.ndarray
        Same shape; bfloat16 as its uint16 bit patterns.
    """
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_storage(arr: np.ndarray, dtype: str) -> np.ndarray | torch.Tensor:
    """What a chunk source yields for stored data: numpy, or a bfloat16 tensor.

    Parameters
    ----------
    arr : numpy.ndarray
        ``(b, ...)`` as stored (uint16 bit patterns for bfloat16).
    dtype : str
        The store dtype.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``arr`` itself, or a ``torch.bfloat16`` view of it.
    """
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return arr


def _chunk_path(array_dir: Path, index: int, ndim: int) -> Path:
    return array_dir.joinpath("c", str(index), *(["0"] * (ndim - 1)))


def _layer_group(name: str) -> str:
    return f"layers/{name}"


def _capture_id(attrs: Mapping) -> str | None:
    """The capture id in a store's root attributes, or None (stores made before them)."""
    tag = attrs.get("peekcore")
    found = tag.get("capture_id") if isinstance(tag, Mapping) else None
    return found if isinstance(found, str) and found else None


def _read_capture_id(meta: Path) -> str | None:
    """The capture id in the root ``zarr.json`` at ``meta`` now, or None."""
    try:
        attrs = json.loads(meta.read_bytes()).get("attributes")
    except (OSError, ValueError, AttributeError):
        return None
    return _capture_id(attrs) if isinstance(attrs, Mapping) else None


def is_empty_dir(path: Path) -> bool:
    """Whether ``path`` is a folder with nothing in it (where no store is yet)."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:  # not there, or not a folder
        return False


def _open_root(path: Path, mode: str) -> tuple[Any, dict]:
    zarr = _zarr()
    if not path.exists():
        raise MissingInputError(f"no activation store at {path}")
    if is_empty_dir(path):
        raise MissingInputError(f"no activation store at {path} (an empty folder)")
    if not (path / "zarr.json").is_file():
        raise StoreError(
            f"{path} is not a zarr store, so not an activation store (no zarr.json; stores are "
            "created whole, so this is a file or a folder of something else): choose another "
            "path, or move it away first"
        )
    try:
        root = zarr.open_group(path, mode=mode, use_consolidated=False)
    except Exception as err:
        raise StoreDamageError(
            f"cannot open {path} as a zarr group ({type(err).__name__}: {err}); its zarr.json is "
            "damaged: remove the folder and capture the store again"
        ) from err
    attrs = dict(root.attrs)
    tag = attrs.get("peekcore")
    if not isinstance(tag, Mapping) or tag.get("kind") != "activation store":
        raise StoreError(
            f"{path} is a zarr store but not a peekcore activation store (no 'peekcore' "
            "attribute); open it with zarr or xarray instead"
        )
    if tag.get("format") != FORMAT:
        raise StoreError(
            f"{path} has store format {tag.get('format')!r}; this peekcore reads format {FORMAT}"
        )
    required = {"n_samples", "chunk_size", "dtype", "layers", "has_labels", "progress"}
    missing = sorted(required - attrs.keys())
    if missing:
        raise StoreDamageError(
            f"the metadata of {path} lacks {missing}: the store is damaged; capture it again "
            "(overwrite=True)"
        )
    _check_progress(path, attrs)
    return root, attrs


def _check_progress(path: Path, attrs: Mapping) -> None:
    """Refuse root metadata whose progress disagrees with its size (``n_samples`` or
    ``chunk_size`` edited, say), before anything is read by it."""
    fix = "the metadata was edited or is damaged; capture the store again (overwrite=True)"
    progress = attrs.get("progress")
    progress = progress if isinstance(progress, Mapping) else {}
    n, cs = attrs.get("n_samples"), attrs.get("chunk_size")
    done, recorded = progress.get("chunks_written"), progress.get("n_chunks")
    if not all(type(v) is int for v in (n, cs, done, recorded)):  # JSON numbers, not "8"
        raise StoreDamageError(
            f"the metadata of {path} has no valid n_samples, chunk_size and progress "
            f"(whole numbers); {fix}"
        )
    if attrs["dtype"] not in STORE_DTYPES:
        raise StoreDamageError(
            f"the metadata of {path} says dtype={attrs['dtype']!r}, not one of "
            f"{', '.join(STORE_DTYPES)}; {fix}"
        )
    if n < 1 or cs < 1:
        raise StoreDamageError(f"the metadata of {path} says n_samples={n}, chunk_size={cs}; {fix}")
    total = math.ceil(n / cs)
    if recorded != total or not 0 <= done <= total:
        raise StoreDamageError(
            f"the metadata of {path} disagrees with itself: n_samples={n} in chunks of {cs} "
            f"make {total} chunks, but its progress counts {done} written of {recorded}; {fix}"
        )


def _n_chunks(attrs: Mapping) -> int:
    return math.ceil(int(attrs["n_samples"]) / int(attrs["chunk_size"]))


def _check_complete(path: Path, attrs: Mapping) -> None:
    progress = attrs["progress"]
    done, total = int(progress.get("chunks_written", -1)), _n_chunks(attrs)
    if done != total:
        raise StoreError(
            f"the store {path} is incomplete: {done} of {total} chunks were written (the "
            "capture stopped early). Run the same peekcore.capture(...) call again to resume "
            "it, or pass overwrite=True to start over"
        )


def _check_arrays(path: Path, root: Any, attrs: Mapping, *, upto: int | None = None) -> dict:
    """Arrays by key after checking them against the root metadata.

    ``upto``: check chunk files only for the first ``upto`` chunks (resume).
    """
    n, cs, dtype = int(attrs["n_samples"]), int(attrs["chunk_size"]), str(attrs["dtype"])
    n_chunks = _n_chunks(attrs) if upto is None else upto
    layers = attrs["layers"]
    if not isinstance(layers, Mapping) or not layers:
        raise StoreDamageError(f"the metadata of {path} lists no layers; the store is damaged")
    expect: dict[str, tuple[tuple[int, ...], np.dtype, str]] = {}
    for name, info in layers.items():
        expect[_layer_group(name) + "/activations"] = (
            (n, *info["shape"]),
            storage_dtype(dtype),
            f"layer {name!r}",
        )
    expect["sample_id"] = ((n,), np.dtype(np.int64), "sample_id")  # one chunk of n
    if attrs["has_labels"]:
        label = attrs.get("label_info", {})
        expect["labels"] = ((n, *label.get("shape", [])), np.dtype(label.get("dtype")), "labels")
    arrays = {}
    fix = "the store is damaged or was changed by hand; capture it again (overwrite=True)"
    for key, (shape, np_dtype, what) in expect.items():
        try:
            arr = root[key]
        except KeyError:
            raise StoreDamageError(
                f"{path}: the metadata lists {what} but there is no array {key}; {fix}"
            ) from None
        if tuple(arr.shape) != shape:
            raise StoreDamageError(
                f"{path}: {what} has shape {tuple(arr.shape)} but the metadata says {shape}; {fix}"
            )
        if np.dtype(arr.dtype) != np_dtype:
            raise StoreDamageError(
                f"{path}: {what} is stored as {arr.dtype} but the metadata says {np_dtype}; {fix}"
            )
        per_chunk, chunks_here = (n, 1) if key == "sample_id" else (cs, n_chunks)
        if tuple(arr.chunks) != (per_chunk, *shape[1:]):
            raise StoreDamageError(
                f"{path}: {what} is chunked {tuple(arr.chunks)}, not {per_chunk} samples per "
                f"chunk as the metadata says; {fix}"
            )
        missing = [
            i for i in range(chunks_here) if not _chunk_path(path / key, i, len(shape)).is_file()
        ]
        if missing:
            shown = ", ".join(
                f"{i} (samples {i * per_chunk}..{min((i + 1) * per_chunk, n) - 1})"
                for i in missing[:5]
            )
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise StoreDamageError(
                f"{path}: {what} is missing {len(missing)} of {chunks_here} chunk files: chunk "
                f"{shown}{more}. They were deleted or never written; capture the store again "
                "(overwrite=True)"
            )
        arrays[key.removesuffix("/activations")] = arr
    for group in ["layers", *(_layer_group(name) for name in layers)]:
        if not (path / group / "zarr.json").is_file():  # zarr opens its arrays without it
            raise StoreDamageError(f"{path}: the group {group} has no zarr.json (deleted?); {fix}")
    return arrays


def _array_keys(attrs: Mapping) -> list[str]:
    """Keys of a store's arrays: each layer's activations, ``sample_id``, ``labels``."""
    keys = [_layer_group(name) + "/activations" for name in attrs["layers"]]
    return [*keys, "sample_id", *(["labels"] if attrs["has_labels"] else [])]


def _chunk_records(path: Path, attrs: Mapping) -> dict[str, list[int]] | None:
    """The CRC32C recorded for each chunk written, by array key; None for stores written
    before peekcore recorded them.

    The records sit in the root's ``progress`` (``progress["crc32c"][key][i]``
    for chunk ``i``), replaced with ``chunks_written`` in one atomic write, so
    they cover exactly the chunks counted as written (one for ``sample_id``).
    Reads compare each chunk file's CRC32C with its record: a file that is
    whole but another chunk's (moved or swapped) is refused.
    """
    records = attrs["progress"].get("crc32c")
    if records is None:
        return None
    done = int(attrs["progress"]["chunks_written"])
    want = {key: 1 if key == "sample_id" else done for key in _array_keys(attrs)}
    fix = "the metadata was edited or is damaged; capture the store again (overwrite=True)"
    if not isinstance(records, Mapping) or set(records) != set(want):
        raise StoreDamageError(
            f"the chunk records of {path} do not list its arrays {sorted(want)}; {fix}"
        )
    out = {}
    for key, count in want.items():
        got = records[key]
        ok = isinstance(got, list) and len(got) == count
        if not ok or not all(type(v) is int and 0 <= v < 1 << 32 for v in got):
            raise StoreDamageError(
                f"the chunk records of {path} for {key} are not {count} CRC32C values; {fix}"
            )
        out[key] = list(got)
    return out
