"""Atomic file writes: nothing the user wrote is lost if a write fails midway."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_write", "save_npz", "load_npz"]


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[tuple[IO[bytes], str]]:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh, tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file atomically: temporary file beside it, fsync, rename.

    Parameters
    ----------
    path : path-like
        Destination. Its folder must exist.
    write : callable
        Called with a binary file object to fill.

    Returns
    -------
    pathlib.Path
        The destination. On any error the destination is untouched and no
        temporary file is left behind.
    """
    dest = Path(path)
    if not dest.parent.exists():
        raise FileNotFoundError(f"cannot write {dest}: folder {dest.parent} does not exist")
    with _temporary_beside(dest) as (fh, tmp):
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return dest


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], header: dict) -> Path:
    """Write arrays and a JSON header (key ``"header"``) to one ``.npz``, atomically."""
    blob = json.dumps(header, default=float).encode()
    payload = {**arrays, "header": np.frombuffer(blob, dtype=np.uint8)}
    return atomic_write(path, lambda fh: np.savez(fh, **payload))


def load_npz(path: str | os.PathLike, fmt: str, what: str) -> tuple[dict, dict[str, Any]]:
    """Read a file written by :func:`save_npz` whose header says ``format == fmt``.

    Returns ``(header, arrays)``; refuses other files with a message naming ``what``.
    """
    with np.load(path, allow_pickle=False) as data:
        if "header" not in data:
            raise ValueError(f"{path} is not a peekcore {what} file (no header)")
        header = json.loads(bytes(data["header"]).decode())
        if header.get("format") != fmt:
            raise ValueError(
                f"{path} is not a peekcore {what} file (it holds {header.get('format')!r})"
            )
        arrays = {k: data[k] for k in data.files if k != "header"}
    return header, arrays
