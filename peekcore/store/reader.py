"""Reading a store: ActivationStore and its layers (StoredLayer), chunk sources."""

from __future__ import annotations

import collections
import contextlib
import math
import operator
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidArgumentError, OutOfRangeError, UnknownNameError
from . import chunkfile
from .chunkfile import _NOT_THE_FILES_FAULT, READ_MODES, _file_identity
from .format import (
    StoreDamageError,
    StoreError,
    _capture_id,
    _check_arrays,
    _check_complete,
    _chunk_records,
    _layer_group,
    _n_chunks,
    _open_root,
    _read_capture_id,
    _StoreChanged,
    from_storage,
    storage_dtype,
)
from .xarrays import layer_data_array

# chunks read in background threads while the current one is used: four reads in
# flight kept the disk busier than two (direct reads 93% of a raw file's speed
# against 77%, benchmarks/bench_store.py), up to READ_AHEAD_BYTES of them
READ_AHEAD = 4
READ_AHEAD_BYTES = 256 << 20


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
        # whole chunks are read without zarr's copies
        self._direct = chunkfile._writes_directly(array)
        # whole chunk files bypass the page cache (O_DIRECT) when it cannot keep them
        self._uncached = self._direct and chunkfile._read_uncached(store.read_mode, self.nbytes)
        # chunk files whose CRC32C passed in this process (shared with shards); see
        # _read_chunk_file. Direct reads come from the disk each time and are always checked.
        self._verified: dict[int, tuple] = {} if verified is None else verified
        # the CRC32C recorded for each chunk when it was written (None: an older store)
        self._records = store._record_of(_layer_group(name) + "/activations")

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
            raise OutOfRangeError(
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
            if not self._direct:  # an encoding peekcore does not write: zarr reads it
                return self._array[start:stop]
            if start % cs or stop % cs:  # whole stored chunks (the last one padded), then cut
                first, end = start // cs, -(-stop // cs)
                whole = self._read_rows(first * cs, end * cs, view=False)
                return whole[start - first * cs : stop - first * cs].copy()
            shape = (stop - start, *self.shape[1:])
            if self._uncached and stop - start == cs:  # read straight into the result
                nbytes = math.prod(shape) * self._np_dtype.itemsize
                buf = chunkfile._aligned_blocks(nbytes + 4)
                at = (self._dir, start // cs, buf, nbytes, len(shape), self._record(start // cs))
                if chunkfile._read_chunk_file_direct(*at):
                    return buf[:nbytes].view(self._np_dtype).reshape(shape)
                self._uncached = False  # the file system refuses O_DIRECT
            if view and not self._uncached and stop - start == cs:
                at = (self._dir, start // cs, shape, self._np_dtype)
                mapped = chunkfile._map_chunk_file(*at, self._verified, self._record(start // cs))
                if mapped is not None:
                    return mapped
            out = np.empty(shape, self._np_dtype)
            for i in range(start // cs, stop // cs):
                rows = out[i * cs - start : (i + 1) * cs - start]
                chunkfile._read_chunk_file(self._dir, i, rows, self._verified, self._record(i))
            return out
        except StoreError:
            raise  # from the read of whole chunks above: said already
        except (ValueError, OSError) as err:
            what = f"samples {start}..{min(stop, self._array.shape[0]) - 1} of layer {self.name!r}"
            raise _read_error(err, what, self.store.path) from err

    def _record(self, index: int) -> int | None:
        """The CRC32C recorded for stored chunk ``index``, or None (a store without records)."""
        return None if self._records is None else self._records[index]

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
            raise InvalidArgumentError(
                f"shard rows [{lo}, {hi}) are not within [0, {self.shape[0]})"
            )
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
        data = self._select(key)
        if self.dtype == "bfloat16" and data.size:
            data = from_storage(np.ascontiguousarray(data), "bfloat16").float().numpy()
        return np.asarray(data, dtype=np.float16 if self.dtype == "float16" else np.float32)

    def _select(self, key: Any) -> np.ndarray:
        """``self[key]`` in the stored dtype (bfloat16 as uint16 bit patterns)."""
        key = _numpy_key(key)
        expect = np.broadcast_to(np.empty((), np.uint8), self.shape)[key]  # bad keys fail here
        if expect.size == 0:
            return np.empty(expect.shape, self._np_dtype)
        lo, hi, local = self._rows_of(key)
        return self._read(lo, hi)[local]

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
    MissingInputError
        No store at ``path`` (a ``FileNotFoundError``).
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
            raise InvalidArgumentError(f"read_mode must be one of {READ_MODES}, got {read_mode!r}")
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
        self._records = _chunk_records(self.path, self.attrs)
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
            raise UnknownNameError(
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

    def _record_of(self, key: str) -> list[int] | None:
        """The CRC32C records of array ``key``'s chunks (None: a store without records)."""
        return None if self._records is None else self._records[key]

    def _read_whole(self, key: str) -> np.ndarray:
        """All of ``labels`` or ``sample_id``, each chunk file checked against its record."""
        self._check_unchanged()
        arr = self._arrays[key]
        try:
            if chunkfile._writes_directly(arr):
                out = _read_chunks(self.path / key, arr, self._record_of(key))
            else:  # an encoding peekcore does not write: zarr reads it
                out = np.asarray(arr[...])
        except (ValueError, OSError) as err:
            raise _read_error(err, f"the {key}", self.path) from err
        self._check_unchanged()
        return out

    @property
    def provenance(self) -> dict:
        """Model class, weights hash, data source, transform, seed, versions."""
        return dict(self.attrs["provenance"])

    # -- checks and views

    def verify(self) -> dict:
        """Check completeness, read every chunk (checksums) and scan for NaN/Inf.

        Each chunk file's CRC32C is also compared with the one recorded for its
        place when it was written, so a chunk file moved or swapped (whole, but
        another chunk's) is found. Stores written before peekcore recorded
        them (``"chunk_records": False`` in the result) are accepted, checked
        without that comparison; capture such a store again to get it.

        Returns
        -------
        dict
            ``{"n_samples", "chunks", "chunk_records", "layers": {name: {"shape",
            "dtype", "nonfinite"}}}`` when everything is in order.

        Raises
        ------
        StoreDamageError
            Listing every problem found when a file is damaged: missing, corrupt,
            moved or swapped chunks (and any NaN/Inf, as below).
        StoreError
            Listing, for each layer, the number of NaN/Inf values and the first
            sample holding one.
        """
        self._check_unchanged()  # another store: nothing to verify
        problems: list[str] = []
        damaged = False
        try:
            _check_complete(self.path, self.attrs)
            _check_arrays(self.path, self._root, self.attrs)
        except StoreError as err:
            problems.append(str(err))
            damaged = True
        report: dict = {
            "n_samples": self.n_samples,
            "chunks": _n_chunks(self.attrs),
            "chunk_records": self._records is not None,
            "layers": {},
        }
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
                    damaged = True
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
                except StoreError as err:
                    problems.append(str(err))
                    damaged = True
        if problems:
            error = StoreDamageError if damaged else StoreError
            raise error(f"store {self.path} failed verification:\n- " + "\n- ".join(problems))
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
            patterns (``attrs["peekcore_dtype"] == "bfloat16"``). Every read
            goes through the store's checks, as ``store[layer][...]`` does:
            each chunk file's CRC32C and the record binding it to its place,
            and that the store is the one opened (``xr.open_zarr`` on the
            folder checks only zarr's CRC32C, so it reads a moved or swapped
            chunk file without complaint).
        """
        stored = self[layer]  # a clear KeyError for unknown layers
        coords = {"sample": ("sample", self.sample_ids)}
        labels = self.labels
        if labels is not None and labels.ndim == 1:
            coords["label"] = ("sample", labels)
        return layer_data_array(stored, coords, {**self.provenance, **stored.attrs})

    def __repr__(self) -> str:
        layers = ", ".join(f"{n}: {self._layers[n].shape[1:]}" for n in self.layers)
        return (
            f"ActivationStore({str(self.path)!r}, n_samples={self.n_samples}, dtype={self.dtype}, "
            f"chunk_size={self.chunk_size}, layers={{{layers}}})"
        )


def _read_chunks(array_dir: Path, array: Any, records: list[int] | None) -> np.ndarray:
    """All of a small array (``labels``, ``sample_id``) read from its chunk files.

    Each chunk file is checked (size, CRC32C, and its record when there is
    one) as activations are, so a damaged file gives one clear error rather
    than zarr's codec error.
    """
    n, cs = int(array.shape[0]), int(array.chunks[0])
    n_chunks = -(-n // cs)
    out = np.empty((n_chunks * cs, *array.shape[1:]), np.dtype(array.dtype))
    for i in range(n_chunks):
        record = None if records is None else records[i]
        chunkfile._read_chunk_file(array_dir, i, out[i * cs : (i + 1) * cs], None, record)
    return out[:n]


def _read_error(err: BaseException, what: str, path: Path) -> BaseException:
    """The error to raise for a failed read of ``what``, a chunk file's fault or not.

    Only what the file gives becomes a :class:`StoreDamageError`: the size,
    CRC32C and record checks (``ValueError``) and I/O errors. Running out of
    descriptors or memory (``EMFILE``, ``ENFILE``, ``ENOMEM``) is no fault of the
    file: it is returned as it was.
    """
    fix = "capture the store again (overwrite=True)"
    if isinstance(err, FileNotFoundError):
        return StoreDamageError(
            f"cannot read {what}: the chunk file {err.filename} is missing (deleted after the "
            f"store was opened?); {fix}"
        )
    if isinstance(err, OSError) and err.errno in _NOT_THE_FILES_FAULT:
        return err
    if isinstance(err, ValueError):
        why = "The chunk file is corrupt (truncated, changed, moved or swapped on disk)"
    else:
        why = (
            "Reading the chunk file failed (a disk or file system error); if it fails "
            "again, the file is damaged"
        )
    return StoreDamageError(
        f"cannot read {what} in {path}: {type(err).__name__}: {str(err).rstrip('.')}. {why}; {fix}"
    )
