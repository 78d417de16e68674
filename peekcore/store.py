"""Activation stores: captured layer activations on disk, in zarr (format 3).

Layout of a store at ``path`` (a folder)::

    path/zarr.json                       root group; its attributes describe the capture
    path/labels                          (N,) int64 or float64, when the data had labels
    path/sample_id                       (N,) int64: index of each sample in the data (one chunk)
    path/layers/<layer>/activations      (N, C, ...) float16, bfloat16 or float32

The activations and labels are chunked along the sample mode only, with the
same number of samples per chunk (``chunk_size``), stored uncompressed with a
CRC32C checksum per chunk; ``sample_id`` is one chunk, written at creation.
Dimensions are named (``sample, channel, y, x``; ``sample, channel, token``
for token outputs), so a layer opens with xarray::

    xr.open_zarr(path, group="layers/layer3", consolidated=False)

bfloat16 has no numpy or zarr type: such arrays hold the raw bfloat16 bit
patterns as uint16 (attribute ``peekcore_dtype = "bfloat16"``); peekcore reads
them back as ``torch.bfloat16``.

The root attributes record the model class, a SHA-256 of its weights, the
layers, the data source, the transform, the seed, the library versions, the
settings of the capture (to check a resumed capture against) and its progress
(``chunks_written`` of ``n_chunks``), and a capture id (``peekcore.capture_id``,
a SHA-256 digest of all of those but the progress: the same for a resumed or
repeated capture, different for another model, data or settings).
``ActivationStore(path)`` refuses a store that is incomplete, whose chunks are
missing, or whose metadata disagrees with its arrays;
:meth:`ActivationStore.verify` also reads every chunk (checksums) and scans for
NaN/Inf. An open store refuses to read on once the store at its path was
replaced (captured again) or changed.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import math
import mmap
import operator
import os
import re
import shutil
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .sources import dtype_label

__all__ = ["ActivationStore", "StoredLayer", "StoreError", "STORE_DTYPES"]

FORMAT = 1
STORE_DTYPES = ("float16", "bfloat16", "float32")
_NUMPY_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
_BF16_NAN_BITS = 0x7FC0
# chunks read in background threads while the current one is used: four reads in
# flight kept the disk busier than two (direct reads 93% of a raw file's speed
# against 77%, benchmarks/bench_store.py), up to READ_AHEAD_BYTES of them
READ_AHEAD = 4
READ_AHEAD_BYTES = 256 << 20
READ_MODES = ("auto", "direct", "buffered")
_DIRECT_ALIGN = 4096  # O_DIRECT buffers, offsets and lengths: multiples of the block size
# buffered reads of chunk files this large go through a huge-page mapping (_copy_mapped)
_MAP_READS = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
_MAP_MIN_BYTES = 2 << 20
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux's value
# Python's mmap keeps its own copy of the file descriptor while the mapping lives, so a
# caller that keeps many chunks would run out of descriptors: past this many live
# mapped chunks (or a quarter of the descriptor limit), chunks are read into new arrays
MAX_LIVE_MAPPINGS = 256
_NOT_THE_FILES_FAULT = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)
_live_mappings = [0]  # mapped chunks alive now (a list: changed from finalizers)
_live_lock = threading.Lock()
# start writing each chunk file to disk as soon as it is complete (see _start_writeback)
WRITE_BEHIND = True
PROGRESS_EVERY_S = 0.2  # progress is recorded after a chunk at most this often (and at the end)
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr's temporary files of unfinished writes


class StoreError(ValueError):
    """An activation store is incomplete, corrupt or inconsistent (the message says how)."""


class _StoreChanged(StoreError):
    """The store at an open store's path is no longer the one opened (captured again, say)."""


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as err:  # pragma: no cover - zarr is a dependency
        raise ImportError(
            "activation stores need zarr 3 (which needs Python >= 3.11): `pip install 'zarr>=3'`"
        ) from err
    if int(zarr.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(
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
        raise ValueError(
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


def _numpy_key(key: Any) -> Any:
    """An index key with numpy's meaning in plain terms: torch tensors and lists as numpy
    arrays, integer scalars (numpy, 0-d arrays and tensors, ``__index__``) as ints."""
    parts = key if isinstance(key, tuple) else (key,)
    out = []
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().numpy()
        elif isinstance(part, list):  # numpy reads a list as an array (bools: a mask)
            part = np.asarray(part) if part else np.empty(0, np.intp)
        if isinstance(part, np.ndarray) and part.ndim == 0 and part.dtype.kind in "iu":
            part = int(part)  # numpy indexes with 0-d integer arrays as with ints
        elif isinstance(part, (bool, np.bool_)):
            part = np.asarray(part)  # a 0-d mask: a new axis of length 1 or 0
        elif (
            part is not None
            and part is not Ellipsis
            and not isinstance(part, (int, slice, np.ndarray))
        ):
            with contextlib.suppress(TypeError):
                part = operator.index(part)
        out.append(part)
    return tuple(out) if isinstance(key, tuple) else out[0]


def _chunk_path(array_dir: Path, index: int, ndim: int) -> Path:
    return array_dir.joinpath("c", str(index), *(["0"] * (ndim - 1)))


def _layer_group(name: str) -> str:
    return f"layers/{name}"


# ---------------------------------------------------------------- reading


class StoredLayer:
    """One layer's activations in a store; a chunk source (``peekcore.sources``).

    ``peekcore.cp_als(store["layer3"], rank=16)`` fits it without loading it whole.

    Attributes
    ----------
    name : str
        Layer name (as in ``model.get_submodule``).
    shape : tuple of int
        ``(N, C, ...)``: samples first.
    dtype : str
        ``"float16"``, ``"bfloat16"`` or ``"float32"``.
    dims : tuple of str
        Dimension names, e.g. ``("sample", "channel", "y", "x")``.
    attrs : dict
        The array's attributes (layer, model class, weights hash, ...).
    chunk_size : int
        Samples per stored chunk.
    """

    def __init__(
        self,
        store: ActivationStore,
        name: str,
        array: Any,
        rows: tuple[int, int] | None = None,
        verified: dict[int, tuple] | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self._array = array
        self._lo, self._hi = rows if rows is not None else (0, int(array.shape[0]))
        self.shape = (self._hi - self._lo, *(int(n) for n in array.shape[1:]))
        self.attrs = dict(array.attrs)
        self.dtype = str(self.attrs.get("peekcore_dtype", array.dtype))
        self.dims = tuple(array.metadata.dimension_names or ())
        self.chunk_size = int(array.chunks[0])
        self._dir = store.path / _layer_group(name) / "activations"
        self._np_dtype = np.dtype(array.dtype)
        self._direct = _writes_directly(array)  # whole chunks are read without zarr's copies
        # whole chunk files bypass the page cache (O_DIRECT) when it cannot keep them
        self._uncached = self._direct and _read_uncached(store.read_mode, self.nbytes)
        # chunk files whose CRC32C passed in this process (shared with shards); see
        # _read_chunk_file. Direct reads come from the disk each time and are always checked.
        self._verified: dict[int, tuple] = {} if verified is None else verified

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored data (without chunk padding and checksums)."""
        return math.prod(self.shape) * storage_dtype(self.dtype).itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, stop: int, view: bool = False) -> np.ndarray:
        """Rows ``start:stop`` of this layer (or shard) as stored, ``0 <= start <= stop <= N``.

        ``view``: a whole stored chunk may come back as a private mapping of its
        file (:func:`_map_chunk_file`), else a new array. The store is checked
        to be the one opened before and after the read
        (:meth:`ActivationStore._check_unchanged`).
        """
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(
                f"rows {start}..{stop} are not within the {self.shape[0]} samples of {self!r}"
            )
        if start == stop:
            return np.empty((0, *self.shape[1:]), self._np_dtype)
        check = self.store._check_unchanged
        check()
        try:
            out = self._read_rows(start + self._lo, stop + self._lo, view)
        except BaseException:
            check()  # a store replaced during the read explains whatever went wrong
            raise
        check()  # the rows came from the store that was opened
        return out

    def _read_rows(self, start: int, stop: int, view: bool) -> np.ndarray:
        """Rows ``start:stop`` of the whole array (not of a shard); see :meth:`_read`."""
        cs = self.chunk_size
        try:
            if self._direct and start % cs == 0 and stop % cs == 0:
                shape = (stop - start, *self.shape[1:])
                if self._uncached and stop - start == cs:  # read straight into the result
                    nbytes = math.prod(shape) * self._np_dtype.itemsize
                    buf = _aligned_blocks(nbytes + 4)
                    if _read_chunk_file_direct(self._dir, start // cs, buf, nbytes, len(shape)):
                        return buf[:nbytes].view(self._np_dtype).reshape(shape)
                    self._uncached = False  # the file system refuses O_DIRECT
                if view and not self._uncached and stop - start == cs:
                    at = (self._dir, start // cs, shape, self._np_dtype)
                    mapped = _map_chunk_file(*at, self._verified)
                    if mapped is not None:
                        return mapped
                out = np.empty(shape, self._np_dtype)
                for i in range(start // cs, stop // cs):
                    rows = out[i * cs - start : (i + 1) * cs - start]
                    _read_chunk_file(self._dir, i, rows, self._verified)
                return out
            return self._array[start:stop]
        except FileNotFoundError as err:
            raise StoreError(
                f"cannot read samples {start}..{stop - 1} of layer {self.name!r}: the chunk "
                f"file {err.filename} is missing (deleted after the store was opened?); "
                "capture the store again (overwrite=True)"
            ) from err
        except (ValueError, OSError) as err:
            # only what the file gives: the size and CRC32C checks (ValueError, also zarr's),
            # and I/O errors. MemoryError and the like are no fault of the file: they pass,
            # and so does running out of descriptors or memory (EMFILE, ENFILE, ENOMEM).
            if isinstance(err, OSError) and err.errno in _NOT_THE_FILES_FAULT:
                raise
            if isinstance(err, ValueError):
                why = "The chunk file is corrupt (truncated or changed on disk)"
            else:
                why = (
                    "Reading the chunk file failed (a disk or file system error); if it fails "
                    "again, the file is damaged"
                )
            raise StoreError(
                f"cannot read samples {start}..{stop - 1} of layer {self.name!r} in "
                f"{self.store.path}: {type(err).__name__}: {str(err).rstrip('.')}. {why}; "
                "capture the store again (overwrite=True)"
            ) from err

    def read(self, start: int | None = 0, stop: int | None = None) -> np.ndarray | torch.Tensor:
        """Samples ``start:stop`` in the stored dtype.

        ``start`` and ``stop`` mean what they mean in ``range(N)[start:stop]``:
        negative values count from the end, values out of range are clipped,
        and ``start >= stop`` gives no samples.

        Returns
        -------
        numpy.ndarray or torch.Tensor
            ``(n, *shape[1:])`` with ``n = len(range(N)[start:stop])``: numpy
            for float16/float32, a ``torch.bfloat16`` tensor for bfloat16.
        """
        start, stop, _ = slice(start, stop).indices(self.shape[0])
        return from_storage(self._read(start, max(start, stop)), self.dtype)

    def chunks(self, chunk_size: int | None = None) -> Iterator[np.ndarray | torch.Tensor]:
        """Consecutive slices ``(b, *shape[1:])`` covering all samples, in order.

        Reads are whole stored chunks, in order, the next ``READ_AHEAD`` (at
        most ``READ_AHEAD_BYTES``) in background threads while the current
        one is used. With buffered reads on Linux (see ``ActivationStore``'s
        ``read_mode``), a stored chunk comes back as a private mapping of its
        file, with no copy (writing to it copies the pages written). A larger
        multiple of the stored chunk size is read straight into each new
        slice; other sizes are cut from the stored chunks (views inside one
        chunk, else copies), since reading such row ranges through zarr ran
        3x slower.

        Parameters
        ----------
        chunk_size : int, optional
            Samples per slice (the last may be shorter); default the stored
            chunk size.

        Yields
        ------
        numpy.ndarray or torch.Tensor
            float16/float32 numpy arrays, or bfloat16 torch tensors.
        """
        cs = self.chunk_size
        step = cs if chunk_size is None else max(1, int(chunk_size))
        n = self.shape[0]
        if step % cs == 0 and self._lo % cs == 0 and (step == cs or not self._uncached):
            # whole stored chunks per slice: each read straight into its slice
            ranges = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
            for arr in self._read_ahead(ranges, view=step == cs):
                yield from_storage(arr, self.dtype)
            return
        buf, filled, done = None, 0, 0  # the slice being assembled across stored chunks
        cuts = [self._lo, *range((self._lo // cs + 1) * cs, self._hi, cs), self._hi]
        stored = [(a - self._lo, b - self._lo) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        for piece in self._read_ahead([(a, b) for a, b in stored if b > a], view=True):
            pos = 0
            while pos < len(piece):
                if buf is None and len(piece) - pos >= min(step, n - done):
                    take = min(step, n - done)  # inside this piece: a view
                    yield from_storage(piece[pos : pos + take], self.dtype)
                    pos, done = pos + take, done + take
                    continue
                if buf is None:
                    buf, filled = np.empty((min(step, n - done), *self.shape[1:]), piece.dtype), 0
                take = min(len(buf) - filled, len(piece) - pos)
                buf[filled : filled + take] = piece[pos : pos + take]
                filled, pos = filled + take, pos + take
                if filled == len(buf):
                    yield from_storage(buf, self.dtype)
                    buf, done = None, done + filled

    def _read_ahead(self, ranges: list[tuple[int, int]], view: bool) -> Iterator[np.ndarray]:
        """``self._read`` of each row range in order, the next ones in background threads."""
        if not ranges:
            return
        row_bytes = math.prod(self.shape[1:]) * self._np_dtype.itemsize
        most = max(b - a for a, b in ranges) * row_bytes
        depth = max(1, min(READ_AHEAD, READ_AHEAD_BYTES // max(1, most)))
        with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="peekcore-read") as pool:
            pending = collections.deque(pool.submit(self._read, *r, view) for r in ranges[:depth])
            for i in range(len(ranges)):
                arr = pending.popleft().result()
                if i + depth < len(ranges):
                    pending.append(pool.submit(self._read, *ranges[i + depth], view))
                yield arr

    def shard(self, lo: int, hi: int) -> StoredLayer:
        """Samples ``[lo, hi)`` as a chunk source of their own; only those rows are read.

        Parameters
        ----------
        lo, hi : int
            ``0 <= lo < hi <= N``.

        Returns
        -------
        StoredLayer
            Shape ``(hi - lo, *shape[1:])``.
        """
        lo, hi = int(lo), int(hi)
        if not 0 <= lo < hi <= self.shape[0]:
            raise ValueError(f"shard rows [{lo}, {hi}) are not within [0, {self.shape[0]})")
        rows = (self._lo + lo, self._lo + hi)
        return StoredLayer(self.store, self.name, self._array, rows, self._verified)

    def __getitem__(self, key: Any) -> np.ndarray:
        """Numpy indexing; bfloat16 comes back as float32.

        Keys are what numpy takes (ints, slices, ``...``, ``None``, integer
        arrays and lists, boolean masks of one or more dimensions), and torch
        tensors as numpy arrays of their values. The rows the key selects are
        read (chunks span whole samples, so that is what the disk has to give
        anyway), then the key is applied in memory.
        """
        key = _numpy_key(key)
        expect = np.broadcast_to(np.empty((), np.uint8), self.shape)[key]  # bad keys fail here
        out_dtype = np.float16 if self.dtype == "float16" else np.float32
        if expect.size == 0:
            return np.empty(expect.shape, out_dtype)
        lo, hi, local = self._rows_of(key)
        data = self._read(lo, hi)
        if self.dtype == "bfloat16":
            data = from_storage(data, "bfloat16").float().numpy()
        return np.asarray(data[local], dtype=out_dtype)

    def _rows_of(self, key: Any) -> tuple[int, int, Any]:
        """The rows ``lo:hi`` a valid, non-empty key (:func:`_numpy_key`) needs, and the key
        that selects the same elements from those rows alone."""
        n = self.shape[0]
        parts = key if isinstance(key, tuple) else (key,)
        lead = 0  # new axes in front take no axis of the data: the next part indexes the rows
        while lead < len(parts) and parts[lead] is None:
            lead += 1
        if lead == len(parts):
            return 0, n, key
        first = parts[lead]
        if first is Ellipsis or (isinstance(first, np.ndarray) and first.ndim == 0):
            return 0, n, key  # the rows are in the ellipsis, or a 0-d mask adds an axis: all
        if isinstance(first, slice):
            r = range(n)[first]  # not empty: the key selects something
            lo, hi = min(r[0], r[-1]), max(r[0], r[-1]) + 1
            stop = r.stop - lo
            first = slice(r.start - lo, stop if stop >= 0 else None, r.step)
        elif isinstance(first, int):
            lo = first + n if first < 0 else first
            hi, first = lo + 1, 0
        elif first.dtype == bool:  # a mask over the first first.ndim axes
            rows = np.flatnonzero(first.reshape(first.shape[0], -1).any(axis=1))
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            first = first[lo:hi]
        else:  # integer index array
            rows = np.where(first < 0, first + n, first)
            lo, hi = int(rows.min()), int(rows.max()) + 1
            first = rows - lo
        return lo, hi, (*parts[:lead], first, *parts[lead + 1 :])

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self[...]
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def to_xarray(self) -> Any:
        """This layer (or shard) as a lazily read ``xarray.DataArray``.

        See :meth:`ActivationStore.to_xarray`.
        """
        da = self.store.to_xarray(self.name)
        if self._lo or self._hi != self._array.shape[0]:
            da = da.isel(sample=slice(self._lo, self._hi))
        return da

    def __repr__(self) -> str:
        rows = "" if self.shape[0] == self._array.shape[0] else f", rows={self._lo}..{self._hi}"
        return (
            f"StoredLayer({self.name!r}, shape={self.shape}, dtype={self.dtype}, "
            f"dims={self.dims}, chunk_size={self.chunk_size}{rows})"
        )


class ActivationStore:
    """Captured activations of one or more layers, read from a zarr store.

    Made by :func:`peekcore.capture`; open an existing one with
    ``ActivationStore(path)``.

    Parameters
    ----------
    path : path-like
        The store folder.
    read_mode : {"auto", "direct", "buffered"}
        How whole chunk files are read. ``"direct"`` bypasses the page cache
        (``O_DIRECT``): the disk's full speed, and a pass over a store larger
        than memory does not evict everything else from the cache to no avail.
        ``"buffered"`` goes through the cache, so later passes over a store
        that fits in memory read at memory speed. ``"auto"`` (default): direct
        for a layer larger than half of the memory available now, else
        buffered. Where the file system refuses ``O_DIRECT`` (tmpfs), reads
        are buffered. Buffered passes (``chunks()``) on Linux hand out the
        stored chunks as private mappings of their files, without a copy.
        Each chunk file's CRC32C is checked the first time this object reads
        it, and again whenever the file has changed since (its inode, size,
        modification or change time); direct reads and :meth:`verify` check
        every time.

        Before and after each read of a chunk the store checks that the store
        at ``path`` is still the one it opened (one ``stat`` of the root
        ``zarr.json``; when that file changed, its capture id is compared, or
        for stores made before capture ids, any change counts): a store
        captured again (``overwrite=True``) or removed since gets a
        ``StoreError`` asking to open it again, instead of data of another
        capture.

    Attributes
    ----------
    path : pathlib.Path
    read_mode : str
    layers : tuple of str
        Layer names, in capture order.
    n_samples : int
        ``N``, the same for every layer.
    chunk_size : int
        Samples per stored chunk.
    dtype : str
        Stored dtype of the activations.
    attrs : dict
        Root attributes: provenance (model class, weights hash, data source,
        transform, seed, versions), settings and progress.

    Raises
    ------
    FileNotFoundError
        No store at ``path``.
    StoreError
        Not a peekcore store, an unfinished capture, missing chunk files, or
        metadata that disagrees with the arrays; the message says which and
        what to do.

    Examples
    --------
    >>> store = ActivationStore("acts.zarr")          # doctest: +SKIP
    >>> model = peekcore.cp_als(store["layer3"], rank=16)  # doctest: +SKIP
    """

    def __init__(self, path: Any, *, read_mode: str = "auto") -> None:
        if read_mode not in READ_MODES:
            raise ValueError(f"read_mode must be one of {READ_MODES}, got {read_mode!r}")
        self.path = Path(path)
        self.read_mode = read_mode
        self._meta = self.path / "zarr.json"
        try:  # before it is read: a change after this shows in the next check
            self._meta_identity: tuple[int, ...] | None = _file_identity(os.stat(self._meta))
        except OSError:
            self._meta_identity = None  # _open_root says what is wrong
        self._root, self.attrs = _open_root(self.path, mode="r")
        self._capture_id = _capture_id(self.attrs)
        _check_complete(self.path, self.attrs)
        self._arrays = _check_arrays(self.path, self._root, self.attrs)
        self.layers = tuple(self.attrs["layers"])
        self.n_samples = int(self.attrs["n_samples"])
        self.chunk_size = int(self.attrs["chunk_size"])
        self.dtype = str(self.attrs["dtype"])
        self._layers = {
            name: StoredLayer(self, name, self._arrays[_layer_group(name)]) for name in self.layers
        }

    def _check_unchanged(self) -> None:
        """Refuse to go on when the store at ``path`` is no longer the one opened.

        One ``stat`` of the root ``zarr.json``: unchanged, all is well. Changed
        (a capture rewrote it, or replaced the store), the file's capture id is
        compared with the one read at opening: the same store (its metadata
        rewritten) passes; another store, none, or a store without capture
        ids (made by an older peekcore) raise :class:`StoreError`.
        """
        try:
            identity = _file_identity(os.stat(self._meta))
        except OSError:
            identity = None
        if identity is not None and identity == self._meta_identity:
            return
        if (
            identity is not None
            and self._capture_id is not None
            and _read_capture_id(self._meta) == self._capture_id
        ):
            self._meta_identity = identity  # the same capture: its metadata was rewritten
            return
        raise _StoreChanged(
            f"the store at {self.path} was replaced or changed since it was opened (captured "
            "again?), so its data may no longer be the data this object describes; open it "
            f"again: ActivationStore({str(self.path)!r})"
        )

    # -- mapping of layers

    def __getitem__(self, layer: str) -> StoredLayer:
        try:
            return self._layers[layer]
        except KeyError:
            raise KeyError(
                f"no layer {layer!r} in the store {self.path}; it has {list(self.layers)}"
            ) from None

    def __contains__(self, layer: object) -> bool:
        return layer in self._layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def keys(self) -> tuple[str, ...]:
        """Layer names, in capture order."""
        return self.layers

    # -- beside the activations

    @property
    def labels(self) -> np.ndarray | None:
        """Labels ``(N,)`` (int64 or float64), or ``None`` when the data had none."""
        return self._read_whole("labels") if "labels" in self._arrays else None

    @property
    def sample_ids(self) -> np.ndarray:
        """``(N,)`` int64: the index of each stored sample in the data source."""
        return self._read_whole("sample_id")

    def _read_whole(self, key: str) -> np.ndarray:
        self._check_unchanged()
        out = np.asarray(self._arrays[key][...])
        self._check_unchanged()
        return out

    @property
    def provenance(self) -> dict:
        """Model class, weights hash, data source, transform, seed, versions."""
        return dict(self.attrs["provenance"])

    # -- checks and views

    def verify(self) -> dict:
        """Check completeness, read every chunk (checksums) and scan for NaN/Inf.

        Returns
        -------
        dict
            ``{"n_samples", "chunks", "layers": {name: {"shape", "dtype", "nonfinite"}}}``
            when everything is in order.

        Raises
        ------
        StoreError
            Listing every problem found: missing or corrupt chunks, and for each
            layer the number of NaN/Inf values and the first sample holding one.
        """
        self._check_unchanged()  # another store: nothing to verify
        problems: list[str] = []
        try:
            _check_complete(self.path, self.attrs)
            _check_arrays(self.path, self._root, self.attrs)
        except StoreError as err:
            problems.append(str(err))
        report: dict = {"n_samples": self.n_samples, "chunks": _n_chunks(self.attrs), "layers": {}}
        for name in self.layers:
            layer = self._layers[name]
            layer._verified.clear()  # check every checksum again
            bad = 0
            first_bad: int | None = None
            for lo in range(0, self.n_samples, self.chunk_size):
                hi = min(lo + self.chunk_size, self.n_samples)
                try:
                    x = torch.as_tensor(layer.read(lo, hi))
                except _StoreChanged:
                    raise
                except StoreError as err:
                    problems.append(str(err))
                    continue
                lo_val, hi_val = torch.aminmax(x)  # fast; NaN and Inf show in the extremes
                if math.isfinite(float(lo_val)) and math.isfinite(float(hi_val)):
                    continue
                finite = torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)
                bad += int((~torch.isfinite(x)).sum())
                if first_bad is None:
                    first_bad = lo + int(torch.nonzero(~finite)[0, 0])
            if bad:
                problems.append(
                    f"layer {name!r} holds {bad} NaN/Inf values (first in sample {first_bad}): "
                    "the model produced them, or float16 overflowed (values above 65504); "
                    "capture with dtype='bfloat16' or 'float32'"
                )
            report["layers"][name] = {"shape": layer.shape, "dtype": layer.dtype, "nonfinite": bad}
        for key in ("labels", "sample_id"):
            if key in self._arrays:
                try:
                    self._read_whole(key)
                except _StoreChanged:
                    raise
                except Exception as err:
                    problems.append(f"cannot read {key}: {type(err).__name__}: {err}")
        if problems:
            raise StoreError(f"store {self.path} failed verification:\n- " + "\n- ".join(problems))
        return report

    def to_xarray(self, layer: str) -> Any:
        """One layer as an ``xarray.DataArray``, read lazily.

        Parameters
        ----------
        layer : str

        Returns
        -------
        xarray.DataArray
            Dimensions as stored (``sample, channel, y, x`` or ``sample,
            channel, token``, ...); coordinates ``sample`` (the sample ids) and
            ``label`` along ``sample`` when there are labels; attributes: the
            array's and the root's provenance. bfloat16 layers hold uint16 bit
            patterns (``attrs["peekcore_dtype"] == "bfloat16"``).
        """
        self[layer]  # a clear KeyError for unknown layers
        self._check_unchanged()  # xarray opens what is at the path now
        try:
            import xarray as xr
        except ImportError as err:
            raise ImportError("to_xarray needs xarray: `pip install xarray`") from err
        ds = xr.open_dataset(
            self.path,
            engine="zarr",
            group=_layer_group(layer),
            consolidated=False,
            chunks=None,
            mask_and_scale=False,
        )
        da = ds["activations"]
        coords = {"sample": ("sample", self.sample_ids)}
        labels = self.labels
        if labels is not None and labels.ndim == 1:
            coords["label"] = ("sample", labels)
        da = da.assign_coords(coords)
        da.attrs = {**self.provenance, **dict(da.attrs)}
        da.name = layer
        return da

    def __repr__(self) -> str:
        layers = ", ".join(f"{n}: {self._layers[n].shape[1:]}" for n in self.layers)
        return (
            f"ActivationStore({str(self.path)!r}, n_samples={self.n_samples}, dtype={self.dtype}, "
            f"chunk_size={self.chunk_size}, layers={{{layers}}})"
        )


# ---------------------------------------------------------------- validation


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
        raise FileNotFoundError(f"no activation store at {path}")
    if is_empty_dir(path):
        raise FileNotFoundError(f"no activation store at {path} (an empty folder)")
    if not (path / "zarr.json").is_file():
        raise StoreError(
            f"{path} is not a zarr store (no zarr.json): not an activation store, or its "
            "creation did not finish; capture it again"
        )
    try:
        root = zarr.open_group(path, mode=mode, use_consolidated=False)
    except Exception as err:
        raise StoreError(
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
        raise StoreError(
            f"the metadata of {path} lacks {missing}: the store is damaged; capture it again "
            "(overwrite=True)"
        )
    return root, attrs


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
        raise StoreError(f"the metadata of {path} lists no layers; the store is damaged")
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
            raise StoreError(
                f"{path}: the metadata lists {what} but there is no array {key}; {fix}"
            ) from None
        if tuple(arr.shape) != shape:
            raise StoreError(
                f"{path}: {what} has shape {tuple(arr.shape)} but the metadata says {shape}; {fix}"
            )
        if np.dtype(arr.dtype) != np_dtype:
            raise StoreError(
                f"{path}: {what} is stored as {arr.dtype} but the metadata says {np_dtype}; {fix}"
            )
        per_chunk, chunks_here = (n, 1) if key == "sample_id" else (cs, n_chunks)
        if tuple(arr.chunks) != (per_chunk, *shape[1:]):
            raise StoreError(
                f"{path}: {what} is chunked {tuple(arr.chunks)}, not {per_chunk} samples per "
                f"chunk as the metadata says; {fix}"
            )
        missing = [
            i for i in range(chunks_here) if not _chunk_path(path / key, i, len(shape)).is_file()
        ]
        if missing:
            shown = ", ".join(
                f"{i} (samples {i * cs}..{min((i + 1) * cs, n) - 1})" for i in missing[:5]
            )
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise StoreError(
                f"{path}: {what} is missing {len(missing)} of {chunks_here} chunk files: chunk "
                f"{shown}{more}. They were deleted or never written; capture the store again "
                "(overwrite=True)"
            )
        arrays[key.removesuffix("/activations")] = arr
    return arrays


# ---------------------------------------------------------------- writing


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


class StoreWriter:
    """Writes a store chunk by chunk and records progress after each (internal to capture).

    A chunk ``k`` (samples ``k*chunk_size ..``) is written to every array, then
    the root attribute ``progress.chunks_written`` is advanced (at most every
    ``PROGRESS_EVERY_S`` seconds, and after the last chunk). Every file is
    replaced atomically (temporary file, rename), so after a crash the store
    holds whole files and ``chunks_written`` never counts a chunk that is not on
    disk; a resumed capture rewrites everything from there. Each whole chunk
    file's writeback to disk starts as soon as it is complete (``WRITE_BEHIND``).
    """

    def __init__(self, path: Path, root: Any, attrs: dict) -> None:
        self.path = path
        self.root = root
        self.attrs = attrs
        self.n_samples = int(attrs["n_samples"])
        self.chunk_size = int(attrs["chunk_size"])
        self.n_chunks = _n_chunks(attrs)
        self.chunks_written = int(attrs["progress"]["chunks_written"])
        self.layers = list(attrs["layers"])
        self._acts = {name: root[_layer_group(name) + "/activations"] for name in self.layers}
        self._labels = root["labels"] if attrs["has_labels"] else None
        self._direct = {name: _writes_directly(arr) for name, arr in self._acts.items()}
        self._extra = []
        if self._labels is not None:
            self._extra.append(("labels", self._labels, _writes_directly(self._labels)))
        self.np_dtypes = {name: np.dtype(arr.dtype) for name, arr in self._acts.items()}
        self._recorded_at = -math.inf

    @property
    def complete(self) -> bool:
        return self.chunks_written == self.n_chunks

    @property
    def samples_written(self) -> int:
        return min(self.chunks_written * self.chunk_size, self.n_samples)

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        n_samples: int,
        chunk_size: int,
        dtype: str,
        layers: Mapping[str, Mapping[str, Any]],
        label_info: Mapping[str, Any] | None,
        attrs: Mapping[str, Any],
        replace: bool = False,
    ) -> StoreWriter:
        """Create an empty store (all metadata, no chunks) atomically.

        ``layers[name]`` has ``shape`` (per sample), ``dims`` and ``attrs``.
        The store is built in a temporary folder beside ``path`` and renamed, so
        ``path`` either does not exist or holds complete metadata; the root
        attributes get a capture id, a digest of the capture's settings and
        provenance. An empty folder at ``path``
        is taken as no store. ``replace``: a store at ``path`` is replaced
        (:func:`check_replaceable`), only now that the new one is ready: it is
        renamed aside, the new one renamed in, and then it is deleted.
        """
        zarr = _zarr()
        from zarr.codecs import Crc32cCodec

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.creating"
        if tmp.exists():
            shutil.rmtree(tmp)
        root_attrs = {
            "peekcore": {"kind": "activation store", "format": FORMAT},
            "n_samples": int(n_samples),
            "chunk_size": int(chunk_size),
            "dtype": dtype,
            "layers": {
                name: {"shape": list(info["shape"]), "dims": list(info["dims"])}
                for name, info in layers.items()
            },
            "has_labels": label_info is not None,
            **({"label_info": dict(label_info)} if label_info is not None else {}),
            **dict(attrs),
            "progress": {"chunks_written": 0, "n_chunks": math.ceil(n_samples / chunk_size)},
        }
        root_attrs = _json(root_attrs)
        # which capture made the store, so that an open store sees when it is replaced:
        # a digest of everything that defines the capture, so a resumed or repeated
        # capture makes the same bytes
        defining = json.dumps(
            {k: v for k, v in root_attrs.items() if k != "progress"}, sort_keys=True
        )
        root_attrs["peekcore"]["capture_id"] = hashlib.sha256(defining.encode()).hexdigest()[:32]
        common = {
            "compressors": (Crc32cCodec(),),
            "filters": None,
            "config": {"write_empty_chunks": True},
            "chunk_key_encoding": {"name": "default", "separator": "/"},
        }
        try:
            root = zarr.open_group(tmp, mode="w-", attributes=root_attrs, zarr_format=3)
            group = root.create_group("layers")
            fill = np.float32("nan") if dtype != "bfloat16" else _BF16_NAN_BITS
            for name, info in layers.items():
                shape = tuple(int(s) for s in info["shape"])
                group.create_group(name).create_array(
                    "activations",
                    shape=(n_samples, *shape),
                    dtype=storage_dtype(dtype),
                    chunks=(chunk_size, *shape),
                    fill_value=fill,
                    dimension_names=tuple(info["dims"]),
                    attributes=_json({**info.get("attrs", {}), "peekcore_dtype": dtype}),
                    **common,
                )
            ids = root.create_array(
                "sample_id",
                shape=(n_samples,),
                dtype=np.int64,
                chunks=(n_samples,),
                fill_value=-1,
                dimension_names=("sample",),
                **common,
            )
            ids[:] = np.arange(n_samples, dtype=np.int64)
            if label_info is not None:
                lshape = tuple(label_info["shape"])
                ldtype = np.dtype(label_info["dtype"])
                root.create_array(
                    "labels",
                    shape=(n_samples, *lshape),
                    dtype=ldtype,
                    chunks=(chunk_size, *lshape),
                    fill_value=-1 if ldtype.kind == "i" else np.nan,
                    dimension_names=("sample", *(f"label_{i}" for i in range(len(lshape)))),
                    **common,
                )
            _move_in(tmp, path, replace)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> StoreWriter:
        """Open a store to resume writing it: check it, drop unfinished temporary files."""
        for leftover in path.rglob("*.partial"):
            if _PARTIAL.search(leftover.name):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        root, attrs = _open_root(path, mode="r+")
        done = int(attrs["progress"].get("chunks_written", -1))
        if not 0 <= done <= _n_chunks(attrs):
            raise StoreError(
                f"{path}: progress says {done} of {_n_chunks(attrs)} chunks written; the "
                "metadata is damaged: capture again with overwrite=True"
            )
        _check_arrays(path, root, attrs, upto=done)
        return cls(path, root, attrs)

    @property
    def direct(self) -> bool:
        """Whether whole chunks are written as files directly (zarr's encoding, fewer copies)."""
        return all(self._direct.values())

    def write_chunk(
        self,
        index: int,
        activations: Mapping[str, np.ndarray],
        labels: np.ndarray | None,
        checksums: Mapping[str, int] | None = None,
    ) -> None:
        """Write chunk ``index`` of every array, then record it as written.

        Parameters
        ----------
        index : int
            Must be ``chunks_written`` (chunks are written in order).
        activations : mapping of layer -> ndarray
            ``(b, *shape)`` in the storage dtype, ``b`` the chunk's sample count.
        labels : ndarray or None
            ``(b, ...)`` when the store has labels.
        checksums : mapping of layer -> int, optional
            CRC32C of each layer's chunk bytes, when the caller computed them.
        """
        if index != self.chunks_written:
            raise RuntimeError(
                f"chunk {index} written out of order (next is {self.chunks_written})"
            )
        lo = index * self.chunk_size
        hi = min(lo + self.chunk_size, self.n_samples)
        whole = hi - lo == self.chunk_size
        checksums = checksums or {}
        for name in self.layers:
            data = activations[name]
            if self._direct[name] and whole:
                _write_chunk_file(
                    self.path / _layer_group(name) / "activations",
                    index,
                    data,
                    self.np_dtypes[name],
                    checksums.get(name),
                )
            else:  # zarr pads the last, partial chunk with the fill value
                self._acts[name][lo:hi] = data
        for key, array, direct in self._extra:
            if whole and direct:
                _write_chunk_file(self.path / key, index, labels, np.dtype(array.dtype))
            else:
                array[lo:hi] = labels
        self.chunks_written = index + 1
        now = time.monotonic()
        if self.complete or now - self._recorded_at >= PROGRESS_EVERY_S:
            self.record_progress()
            self._recorded_at = now

    def record_progress(self) -> None:
        """Record ``chunks_written`` in the root metadata (zarr replaces the file atomically)."""
        progress = {"chunks_written": self.chunks_written, "n_chunks": self.n_chunks}
        self.root.attrs.update({"progress": progress})


def _writes_directly(array: Any) -> bool:
    """Whether chunks of ``array`` may be written as files by :func:`_write_chunk_file`.

    True for the encoding peekcore creates (zarr 3 ``bytes`` little-endian, then
    ``crc32c``, "/"-separated default chunk keys) on a little-endian machine.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec

    meta = array.metadata
    codecs = list(getattr(meta, "codecs", ()))
    encoding = getattr(meta, "chunk_key_encoding", None)
    return (
        sys.byteorder == "little"
        and len(codecs) == 2
        and isinstance(codecs[0], BytesCodec)
        and str(getattr(codecs[0].endian, "value", codecs[0].endian)) == "little"
        and isinstance(codecs[1], Crc32cCodec)
        and getattr(encoding, "name", None) == "default"
        and getattr(encoding, "separator", None) == "/"
    )


def _write_chunk_file(
    array_dir: Path, index: int, data: np.ndarray, dtype: np.dtype, crc: int | None = None
) -> None:
    """Write one whole chunk the way zarr encodes it: raw bytes, then their CRC32C.

    This is byte for byte what zarr's ``bytes`` + ``crc32c`` codecs produce, without
    their copies; like zarr, the file is written beside its place and renamed.
    ``crc``: the CRC32C of the bytes when already known. With ``WRITE_BEHIND`` the
    file's writeback is started before the rename (:func:`_start_writeback`).
    """
    import google_crc32c

    data = np.ascontiguousarray(data, dtype=dtype)
    if data.ndim == 0:
        raise ValueError("a chunk has at least one dimension")
    raw = data.reshape(-1).view(np.uint8)
    path = _chunk_path(array_dir, index, data.ndim)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as fh:
            raw.tofile(fh)  # numpy's own write: no copy, and faster than fh.write here
            if crc is None:
                crc = google_crc32c.value(raw)
            fh.write(np.uint32(crc).astype("<u4").tobytes())
            if WRITE_BEHIND:
                fh.flush()
                _start_writeback(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _read_chunk_file(
    array_dir: Path, index: int, out: np.ndarray, verified: dict[int, tuple] | None = None
) -> None:
    """Read one whole chunk written as :func:`_write_chunk_file` writes it into ``out``.

    Checks the file's size and CRC32C, as zarr's codecs would (``ValueError``).
    Files of at least ``_MAP_MIN_BYTES`` are read through a mapping advised
    ``MADV_HUGEPAGE`` where Linux offers it (:func:`_copy_mapped`); others, and
    files that cannot be mapped, with ``readinto`` (:func:`_readinto_full`).
    Both go through the page cache.

    ``verified`` (:func:`_check_unless_verified`): a file whose identity has
    not changed since its CRC32C passed in this process is not checked again:
    its bytes come from the page cache that the check read, and any write to
    the file changes its change time.
    """
    path = _chunk_path(array_dir, index, out.ndim)
    raw = out.reshape(-1).view(np.uint8)
    with open(path, "rb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        size = st.st_size
        tail: bytes | bytearray | None = None
        if size == raw.size + 4 and size >= _MAP_MIN_BYTES and _MAP_READS:
            tail, got = _copy_mapped(fh.fileno(), raw), size
        if tail is None:
            tail = bytearray(5)  # the CRC, and one byte more to see a longer file
            got = _readinto_full(fh, raw)
            if got == raw.size:
                got += _readinto_full(fh, tail)
    _check_unless_verified(path, raw, got, bytes(tail[:4]), st, index, verified)


def _check_unless_verified(
    path: Path,
    raw: np.ndarray,
    got: int,
    tail: bytes,
    st: os.stat_result,
    index: int,
    verified: dict[int, tuple] | None,
) -> bool:
    """:func:`_check_chunk_bytes`, unless ``verified`` says this file passed as it is now.

    ``verified``: chunk index -> :func:`_file_identity` of the file when its
    CRC32C last passed in this process; updated here. Returns whether the check
    was skipped.
    """
    ident = _file_identity(st)
    if verified is not None and got == raw.size + 4 and verified.get(index) == ident:
        return True
    _check_chunk_bytes(path, raw, got, tail)
    if verified is not None:
        verified[index] = ident
    return False


def _readinto_full(fh: Any, buf: Any) -> int:
    """Read file ``fh`` into all of ``buf`` (bytes-like); the bytes read, fewer at its end.

    One ``readinto`` may read less than asked: Linux reads at most 0x7ffff000
    bytes (just under 2 GiB) per call, and other systems and file systems
    have their own limits; so it reads until ``buf`` is full or the file ends.
    """
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _mapping_limit() -> int:
    """Most mapped chunks alive at once: ``MAX_LIVE_MAPPINGS``, at most a quarter of the
    process's descriptor limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_LIVE_MAPPINGS
    if soft == resource.RLIM_INFINITY:
        return MAX_LIVE_MAPPINGS
    return max(0, min(MAX_LIVE_MAPPINGS, soft // 4))


def _mapping_released() -> None:
    with _live_lock:
        _live_mappings[0] -= 1


def _file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or written: device, inode, size, times (ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _copy_mapped(fd: int, raw: np.ndarray) -> bytes | None:
    """Copy the first ``raw.size`` bytes of file ``fd`` into ``raw`` through a mapping.

    Returns the 4 bytes after them (the CRC), or None where the file cannot be
    mapped (out of mappings, say), having copied nothing. With ``MADV_HUGEPAGE`` a cold
    file is read ahead in 2 MiB folios from its first byte, where ``read``
    starts every file with small pages and small requests: on the test VM
    32 chunk files of 25 MiB read at 2.6-2.7 GB/s this way against 2.0-2.2
    with ``read`` (``benchmarks/bench_store.py``), and the pages stay cached
    for the next pass. The caller checked the file's size first; a file
    truncated by another process during the copy would end the process
    (``SIGBUS``), but chunk files are only ever replaced by a rename.
    """
    try:
        mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    except OSError:
        return None
    with mapped:
        _advise(mapped, mmap.MADV_HUGEPAGE)
        src = np.frombuffer(mapped, np.uint8, count=raw.size)
        np.copyto(raw, src)
        del src  # the mapping closes only once no array sees it
        return mapped[raw.size : raw.size + 4]


def _map_chunk_file(
    array_dir: Path,
    index: int,
    shape: tuple[int, ...],
    dtype: np.dtype,
    verified: dict[int, tuple],
) -> np.ndarray | None:
    """One whole chunk file's data as an array backed by a private mapping of the file, or None.

    None where mappings are not used (``_MAP_READS``), for files under
    ``_MAP_MIN_BYTES`` and for files of the wrong size (the caller's ``read``
    then gives the error). The CRC32C is checked, which also brings every page
    in, unless ``verified`` says this file passed before (see
    :func:`_read_chunk_file`); then the pages are mapped in ahead of use
    (``MADV_POPULATE_READ``) instead. The mapping lives as long as the array:
    no copy and no new memory for a pass over data in the page cache. The
    array is writable; a write copies the page it touches (``MAP_PRIVATE``).
    Until then the bytes are the file's, so the file must not be changed in
    place while the array is used; peekcore only ever replaces chunk files by
    a rename.
    """
    if not _MAP_READS:
        return None
    path = _chunk_path(array_dir, index, len(shape))
    nbytes = math.prod(shape) * dtype.itemsize
    with _live_lock:  # a place among the live mappings, or new arrays (no descriptors held)
        if _live_mappings[0] >= _mapping_limit():
            return None
        _live_mappings[0] += 1
    try:
        with open(path, "rb", buffering=0) as fh:
            st = os.fstat(fh.fileno())
            if st.st_size != nbytes + 4 or st.st_size < _MAP_MIN_BYTES:
                mapped = None
            else:
                try:  # private: writes to the array copy the page they touch, not the file
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                except OSError:  # out of mappings or commit charge (strict overcommit)
                    mapped = None
    except BaseException:
        _mapping_released()
        raise
    if mapped is None:
        _mapping_released()
        return None  # the caller reads the file
    weakref.finalize(mapped, _mapping_released)
    _advise(mapped, mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(mapped, np.uint8, count=nbytes)
    tail = mapped[nbytes : nbytes + 4]
    if _check_unless_verified(path, raw, st.st_size, tail, st, index, verified):
        _advise(mapped, _MADV_POPULATE_READ)  # no CRC read them: map the pages in ahead of use
    return raw.view(dtype).reshape(shape)


def _advise(mapped: mmap.mmap, advice: int) -> None:
    """``madvise`` as advice only: a kernel without it (no THP, Linux < 5.14) still reads."""
    with contextlib.suppress(OSError):
        mapped.madvise(advice)


def _available_memory() -> int | None:
    """Bytes of memory available for new data now (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_uncached(mode: str, nbytes: int) -> bool:
    """Whether a layer of ``nbytes`` is read with ``O_DIRECT`` (see ``ActivationStore``)."""
    if mode != "auto":
        return mode == "direct" and hasattr(os, "O_DIRECT")
    avail = _available_memory()
    return hasattr(os, "O_DIRECT") and avail is not None and nbytes > avail // 2


def _aligned_blocks(nbytes: int) -> np.ndarray:
    """``uint8`` buffer for an ``O_DIRECT`` read of a file of ``nbytes``.

    Its address is block-aligned and its size is ``nbytes + 1`` rounded up to
    whole blocks: a direct read asks for whole blocks, and the extra byte
    shows a file longer than expected.
    """
    size = -(-(nbytes + 1) // _DIRECT_ALIGN) * _DIRECT_ALIGN
    base = np.empty(size + _DIRECT_ALIGN, np.uint8)
    off = -base.ctypes.data % _DIRECT_ALIGN
    return base[off : off + size]


def _read_chunk_file_direct(
    array_dir: Path, index: int, buf: np.ndarray, nbytes: int, ndim: int
) -> bool:
    """Read one whole chunk file of ``nbytes`` data bytes into ``buf`` with ``O_DIRECT``.

    ``buf`` comes from :func:`_aligned_blocks` (``nbytes + 4``); the file's size
    and CRC32C are checked as in :func:`_read_chunk_file` (``ValueError``).
    Returns False, having read nothing, where the file system refuses
    ``O_DIRECT``.
    """
    path = _chunk_path(array_dir, index, ndim)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    got = 0
    try:
        while got < buf.size:
            n = os.readv(fd, [memoryview(buf[got:])])
            got += n
            if n == 0 or n % _DIRECT_ALIGN:  # end of file
                break
    except OSError as err:
        if err.errno == errno.EINVAL and got == 0:  # alignment refused by this file system
            return False
        raise
    finally:
        os.close(fd)
    _check_chunk_bytes(path, buf[:nbytes], got, buf[nbytes : nbytes + 4].tobytes())
    return True


def _check_chunk_bytes(path: Path, raw: np.ndarray, got: int, tail: bytes) -> None:
    """Refuse a chunk file of the wrong size or whose CRC32C does not match (``ValueError``)."""
    import google_crc32c

    if got != raw.size + 4:
        raise ValueError(f"chunk file {path} does not hold {raw.size + 4} bytes")
    if np.frombuffer(tail, "<u4")[0] != google_crc32c.value(raw):
        raise ValueError(f"chunk file {path} fails its CRC32C checksum")


@functools.cache
def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux, 64-bit offsets), or None."""
    if not sys.platform.startswith("linux") or sys.maxsize < 2**32:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # pragma: no cover - not glibc or musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> bool:
    """Start writing a file's dirty pages to disk, without waiting for it (write-behind).

    A capture writes far more than it will read back soon: starting each chunk
    file's writeback once it is complete keeps the disk busy while the model
    runs, instead of leaving it all in the page cache to be flushed in one go
    later (or to throttle the writer once the kernel's dirty limit is hit). The
    pages stay cached. Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, as
    RocksDB's ``bytes_per_sync`` and PostgreSQL's ``*_flush_after`` do; it says
    nothing about durability (no metadata, no cache flush). Returns whether it
    was started (False on other systems, or where the file system refuses).
    """
    fn = _sync_file_range()
    return fn is not None and fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


def _move_in(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the new store ``tmp`` to ``path``, replacing a store there if ``replace``."""
    if is_empty_dir(path):
        path.rmdir()
    if not os.path.lexists(path):
        tmp.rename(path)
        return
    if not replace:
        raise FileExistsError(f"{path} exists: cannot create a store there")
    check_replaceable(path)
    old = path.parent / f".{path.name}.replaced-{uuid.uuid4().hex[:12]}"
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_replaceable(path: Path) -> None:
    """Refuse (``FileExistsError``) a ``path`` that holds something other than a store.

    Parameters
    ----------
    path : pathlib.Path
        Nothing, an empty folder, or a peekcore store (complete or not) pass.

    Raises
    ------
    FileExistsError
        When ``path`` holds something that is not a peekcore activation store.
    """
    if not os.path.lexists(path) or is_empty_dir(path):
        return
    meta = path / "zarr.json"
    try:
        tag = json.loads(meta.read_text()).get("attributes", {}).get("peekcore", {})
    except (OSError, ValueError, AttributeError):
        tag = {}
    if not path.is_dir() or not isinstance(tag, dict) or tag.get("kind") != "activation store":
        raise FileExistsError(
            f"{path} exists and is not a peekcore activation store; overwrite=True only "
            "replaces stores: choose another path or remove it yourself"
        )


def remove_store(path: Path) -> None:
    """Delete a peekcore store folder; refuse anything that is not one.

    Parameters
    ----------
    path : pathlib.Path
        A store, or an empty folder.

    Raises
    ------
    FileExistsError
        When ``path`` holds something that is not a peekcore activation store.
    """
    check_replaceable(path)
    if is_empty_dir(path):
        path.rmdir()
    elif os.path.lexists(path):
        shutil.rmtree(path)
