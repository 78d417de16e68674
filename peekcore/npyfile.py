"""``.npy`` files as chunk sources, read chunk by chunk rather than memory-mapped.

A memory mapping of a file that another program truncates kills the process
that touches a page past the new end (``SIGBUS``), with no Python error to
catch. :class:`NpyFile` therefore checks the file's size against its header
when it is opened (a truncated file gets a clear error, not numpy's "mmap
length is greater than file size") and reads each chunk into a new array; a
file that shrinks during a pass gives a :class:`~peekcore.errors.DataError`.
:class:`NpyArray` does the same for captures, whose inputs are indexed by
sample rather than streamed in chunks. Only a Fortran-ordered file (rare; its
rows are not contiguous on disk) is still mapped, after the same size check.
"""

from __future__ import annotations

import math
import operator
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import dtype_name
from .errors import DataError, InvalidArgumentError, InvalidTypeError, OutOfRangeError

__all__ = ["NpyArray", "NpyFile", "map_npy", "open_npy", "read_npy_header"]


def read_npy_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of a ``.npy`` file, or a DataError.

    Parameters
    ----------
    path : pathlib.Path

    Raises
    ------
    DataError
        Not a ``.npy`` file, or one that holds Python objects.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, then refuse to seek
        raise DataError(
            f"{path} is not a regular file (a pipe, device or folder); peekcore reads .npy "
            "files by position: save the array to a file with numpy.save"
        )
    with open(path, "rb") as fh:
        return _header_of(fh, path)


def _header_of(fh: Any, path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """:func:`read_npy_header` of the file open as ``fh`` (read from its start)."""
    fmt = np.lib.format
    try:
        fh.seek(0)
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        else:  # 2.0 and 3.0 differ from 2.0 only in how field names are encoded
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        offset = fh.tell()
    except (ValueError, EOFError, SyntaxError) as err:
        raise DataError(
            f"{path} is not a readable .npy file ({type(err).__name__}: {err}); save the array "
            "with numpy.save"
        ) from err
    if dtype.hasobject:
        raise DataError(f"{path} holds Python objects ({dtype}); save a numeric array instead")
    return tuple(int(n) for n in shape), bool(fortran), dtype, offset


def open_npy(path: str | os.PathLike, *, by_sample: bool = False) -> NpyFile | NpyArray | np.memmap:
    """A ``.npy`` file read from the file rather than mapped: an :class:`NpyFile` (by
    chunks, a fit's source) or with ``by_sample`` an :class:`NpyArray` (indexed by
    sample: capture inputs, report images); for the rare Fortran-ordered file (whose rows
    are not contiguous on disk) :func:`map_npy`.

    Raises
    ------
    DataError
        Not a numeric ``.npy`` file, or truncated.
    """
    shape, fortran, _, _ = read_npy_header(Path(path))
    if fortran or not shape:
        return map_npy(path)
    return NpyArray(path) if by_sample else NpyFile(path)


def map_npy(path: str | os.PathLike) -> np.memmap:
    """A ``.npy`` file memory-mapped read-only, once its size is checked against its header.

    Where a file may shrink while it is mapped, prefer :class:`NpyFile`: a
    mapping cannot turn that into an error (the process gets ``SIGBUS``).

    Raises
    ------
    DataError
        Not a numeric ``.npy`` file, or truncated (numpy would say "mmap length
        is greater than file size").
    """
    path = Path(path)
    shape, _, dtype, offset = read_npy_header(path)
    need = offset + math.prod(shape) * dtype.itemsize
    have = os.stat(path).st_size
    if have < need:
        raise DataError(
            f"{path} is truncated: its header declares shape {shape} {dtype} ({need} bytes "
            f"with the header) but the file holds {have} bytes; it was cut short (an "
            "interrupted save or copy?): save or copy it again"
        )
    return np.load(path, mmap_mode="r")


class _Rows:
    """Where the rows of a C-ordered ``.npy`` file lie, and how to read them.

    Parameters
    ----------
    path : pathlib.Path
    shape : tuple of int
        The whole array's shape ``(N, ...)`` from the header.
    dtype : numpy.dtype
    offset : int
        Byte offset of row 0 (the header's size).
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
        self.path, self.dtype, self.offset = path, dtype, offset
        self.row_shape = shape[1:]
        self.row_bytes = math.prod(self.row_shape) * dtype.itemsize

    def check_size(self, n_rows: int, what: str, fh: Any = None) -> None:
        """Raise a DataError when the file (the one open as ``fh``, if given) is too short
        for ``n_rows`` rows."""
        need = self.offset + n_rows * self.row_bytes
        have = (os.fstat(fh.fileno()) if fh is not None else os.stat(self.path)).st_size
        if have < need:
            raise DataError(
                f"{self.path} {what}: its header declares {n_rows} rows of shape "
                f"{self.row_shape} {self.dtype} ({need} bytes with the header) but the file "
                f"holds {have} bytes; it was cut short (an interrupted save or copy?), or "
                "changed while peekcore read it: save or copy it again, and use a file that "
                "nothing writes to meanwhile"
            )

    def read(self, fh: Any, start: int, stop: int, n_rows: int) -> np.ndarray:
        """Rows ``[start, stop)`` read from the open file ``fh`` into a new array.

        ``n_rows`` is how many rows the file must hold (for the error message).

        Raises
        ------
        DataError
            When the file ends before row ``stop`` (it shrank since it was opened).
        """
        out = np.empty((stop - start, *self.row_shape), self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        fh.seek(self.offset + start * self.row_bytes)
        got = 0
        while got < len(view):  # one read may return less (2 GiB at most on Linux)
            n = fh.readinto(view[got:])
            if not n:  # the file ends early: it shrank since it was opened
                self.check_size(n_rows, "shrank while it was read", fh)
                raise DataError(f"{self.path} ended early, in the rows from {start}")
            got += n
        return out


def _c_ordered_rows(path: Path) -> tuple[_Rows, tuple[int, ...]]:
    shape, fortran, dtype, offset = read_npy_header(path)
    if fortran or not shape:
        raise DataError(f"{path}: only C-ordered arrays of at least 1 mode are read by rows")
    rows = _Rows(path, shape, dtype, offset)
    rows.check_size(shape[0], "is truncated")
    return rows, shape


class NpyFile:
    """A ``.npy`` file (or rows of it) as a chunk source, read with plain reads.

    Parameters
    ----------
    path : path-like
        A C-ordered ``.npy`` file of shape ``(N, ...)``.
    rows : (int, int), optional
        Only rows ``[lo, hi)`` (a shard).

    Raises
    ------
    DataError
        The file is shorter than its header declares (truncated), or is not
        a numeric ``.npy`` file.
    """

    device = "cpu"

    def __init__(self, path: str | os.PathLike, rows: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        self._rows, shape = _c_ordered_rows(self.path)
        self.np_dtype = self._rows.dtype
        self._dtype = dtype_name(self.np_dtype)
        self._lo, self._hi = rows if rows is not None else (0, shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._hi - self._lo, *self._rows.row_shape)

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def source_info(self) -> dict[str, Any]:
        """What results record as their source: the file."""
        return {"file": str(self.path.resolve())}

    def chunks(self, chunk_size: int) -> Iterator[np.ndarray]:
        """Consecutive rows ``(b, ...)``, each read from the file into a new array.

        Raises
        ------
        DataError
            When the file ends before a chunk does (it shrank during the pass).
        """
        step = max(1, int(chunk_size))
        with open(self.path, "rb", buffering=0) as fh:
            for start in range(self._lo, self._hi, step):
                yield self._rows.read(fh, start, min(start + step, self._hi), self._hi)

    def shard(self, lo: int, hi: int) -> NpyFile:
        """Rows ``[lo, hi)`` as a source of their own."""
        return NpyFile(self.path, (self._lo + int(lo), self._lo + int(hi)))

    def __repr__(self) -> str:
        return f"NpyFile({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


class NpyArray:
    """A ``.npy`` file as a read-only array whose every index is read from the file.

    What :func:`peekcore.capture` uses for a ``.npy`` of model inputs (any
    numeric dtype, images as ``uint8`` say), and a report for its images:
    ``a[i]`` and ``a[start:stop]`` return new arrays read with plain reads, so
    a file that shrinks during the capture gives a
    :class:`~peekcore.errors.DataError`, not ``SIGBUS``.

    Each read opens the file anew (safe in forked DataLoader workers). Inside
    ``with a:`` every read goes through one descriptor instead, opened on entry
    and checked to hold the header read at construction: a file replaced
    meanwhile (renamed over) is then still read as it was, never half old and
    half new; one changed in place to other contents cannot be told apart.
    Not for use by several threads at once while held.

    Parameters
    ----------
    path : path-like
        A C-ordered ``.npy`` file of shape ``(N, ...)``.
    row_shape : tuple of int, optional
        Read each row as this shape (as many values as a stored row): ``(1, H,
        W)`` for grey images stored ``N x H x W``, say.

    Raises
    ------
    DataError
        Truncated, or not a numeric ``.npy`` file.
    """

    def __init__(self, path: str | os.PathLike, row_shape: tuple[int, ...] | None = None) -> None:
        self.path = Path(path)
        self._rows, self.shape = _c_ordered_rows(self.path)
        self._header = (self.shape, False, self._rows.dtype, self._rows.offset)
        self.dtype = self._rows.dtype
        self._fh: Any = None  # the descriptor held inside ``with``
        self._held = 0  # nested ``with`` entries
        if row_shape is not None:
            if math.prod(row_shape) != math.prod(self._rows.row_shape):
                raise InvalidArgumentError(
                    f"rows of shape {self._rows.row_shape} cannot be {row_shape}"
                )
            self._rows.row_shape = tuple(row_shape)
            self.shape = (self.shape[0], *self._rows.row_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._rows.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int | slice) -> np.ndarray:
        n = self.shape[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            lo, hi = (start, max(start, stop)) if step > 0 else (0, n)
            return self._read(lo, hi)[slice(start - lo, stop - lo, step) if step > 0 else index]
        if isinstance(index, bool):  # numpy reads a[True] as a[None], not as row 1
            raise InvalidTypeError(f"index rows by an integer or a slice, got {index!r}")
        i = operator.index(index)  # a TypeError for anything but an integer or a slice
        if not -n <= i < n:
            raise OutOfRangeError(f"row {i} is out of range for {n} rows")
        i %= n
        return self._read(i, i + 1)[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self._read(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __enter__(self) -> NpyArray:
        if self._held == 0:
            fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by __exit__
            try:
                if _header_of(fh, self.path) != self._header:
                    raise DataError(
                        f"{self.path} was replaced by another array since peekcore opened it "
                        "(its header differs); use a file that nothing writes to meanwhile"
                    )
                self._rows.check_size(self.shape[0], "is truncated", fh)
            except BaseException:
                fh.close()
                raise
            self._fh = fh
        self._held += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._held -= 1
        if self._held == 0:
            fh, self._fh = self._fh, None
            fh.close()

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._fh is not None:
            return self._rows.read(self._fh, start, stop, self.shape[0])
        # a file opened per read: cheap next to a batch, and safe in forked DataLoader workers
        with open(self.path, "rb", buffering=0) as fh:
            return self._rows.read(fh, start, stop, self.shape[0])

    def __repr__(self) -> str:
        return f"NpyArray({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"
