"""``.npy`` files as chunk sources, read chunk by chunk rather than memory-mapped.

A memory mapping of a file that another program truncates kills the process
that touches a page past the new end (``SIGBUS``), with no Python error to
catch. :class:`NpyFile` therefore checks the file's size against its header
when it is opened (a truncated file gets a clear error, not numpy's "mmap
length is greater than file size") and reads each chunk into a new array; a
file that shrinks during a pass gives a :class:`~peekcore.errors.DataError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import dtype_name
from .errors import DataError

__all__ = ["NpyFile", "map_npy", "open_npy", "read_npy_header"]


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
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
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


def open_npy(path: str | os.PathLike) -> NpyFile | np.memmap:
    """A ``.npy`` file for reading by chunks: an :class:`NpyFile`, or for the rare
    Fortran-ordered file (whose rows are not contiguous on disk) :func:`map_npy`.

    Raises
    ------
    DataError
        Not a numeric ``.npy`` file, or truncated.
    """
    shape, fortran, _, _ = read_npy_header(Path(path))
    return NpyFile(path) if not fortran and shape else map_npy(path)


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
        shape, fortran, self.np_dtype, self._offset = read_npy_header(self.path)
        if fortran or not shape:
            raise ValueError(f"{self.path}: NpyFile reads C-ordered arrays of at least 1 mode")
        self._dtype = dtype_name(self.np_dtype)
        self._row_shape = shape[1:]
        self._row_bytes = math.prod(self._row_shape) * self.np_dtype.itemsize
        self._lo, self._hi = rows if rows is not None else (0, shape[0])
        self._check_size(shape[0], "is truncated")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._hi - self._lo, *self._row_shape)

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def source_info(self) -> dict[str, Any]:
        """What results record as their source: the file."""
        return {"file": str(self.path.resolve())}

    def _check_size(self, n_rows: int, what: str) -> None:
        need = self._offset + n_rows * self._row_bytes
        have = os.stat(self.path).st_size
        if have < need:
            raise DataError(
                f"{self.path} {what}: its header declares {n_rows} rows of shape "
                f"{self._row_shape} {self.np_dtype} ({need} bytes with the header) but the file "
                f"holds {have} bytes; it was cut short (an interrupted save or copy?), or "
                "changed while peekcore read it: save or copy it again, and fit a file that "
                "nothing writes to meanwhile"
            )

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
                out = np.empty((min(step, self._hi - start), *self._row_shape), self.np_dtype)
                view = memoryview(out.reshape(-1).view(np.uint8))
                fh.seek(self._offset + start * self._row_bytes)
                got = 0
                while got < len(view):  # one read may return less (2 GiB at most on Linux)
                    n = fh.readinto(view[got:])
                    if not n:  # the file ends early: it shrank since it was opened
                        self._check_size(self._hi, "shrank while it was read")
                        raise DataError(f"{self.path} ended early, in the chunk at row {start}")
                    got += n
                yield out

    def shard(self, lo: int, hi: int) -> NpyFile:
        """Rows ``[lo, hi)`` as a source of their own."""
        return NpyFile(self.path, (self._lo + int(lo), self._lo + int(hi)))

    def __repr__(self) -> str:
        return f"NpyFile({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"
