"""Atomic file writes: nothing the user wrote is lost if a write fails midway."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from ._validate import check_output_file
from .errors import FileFormatError, InvalidArgumentError, InvalidTypeError, MissingInputError

__all__ = [
    "atomic_write",
    "remove_stale_temporaries",
    "current_umask",
    "save_npz",
    "load_npz",
    "open_npz",
    "read_header",
]


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows.

    ``os.umask`` can only be read by setting it, for a moment, for all threads;
    Linux shows it in ``/proc/self/status``.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would give: the existing file's, else 0666 - umask.

    ``mkstemp`` makes owner-only files (0600); a model or checkpoint on shared
    storage must stay readable as the user's other files are.
    """
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    return 0o666 & ~current_umask()


def _temporary_pattern(path: Path) -> re.Pattern:
    """Names of the temporaries atomic_write makes for ``path``: ``.NAME.PID.XXXXXXXX.tmp``."""
    return re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[A-Za-z0-9_]{{8}}\.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process (or no such pid at all)
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of writes to ``path`` whose writer died (SIGKILL, power loss).

    Only files provably left by :func:`atomic_write` for this very path are
    touched: named ``.NAME.PID.XXXXXXXX.tmp`` beside it, whose writer process
    ``PID`` is gone, and on which no process holds the lock a writer keeps while
    it fills the file (so a live writer on another host of a shared file system
    is left alone where the file system supports ``flock``).

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    path = Path(path)
    pattern = _temporary_pattern(path)
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        tmp = path.parent / name
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.unlink(tmp)
                removed.append(tmp)
        except OSError:  # locked: someone still writes it
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[tuple[IO[bytes], str]]:
    # the writer's pid in the name and a lock while it is filled: remove_stale_temporaries
    # can then tell a dead writer's leftover from a write in progress
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    try:
        with contextlib.suppress(OSError):  # where the file system has no locks or modes
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(OSError):
            os.fchmod(fd, _new_file_mode(path))
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
        Destination: a regular file (replaced, keeping its permissions) or
        nothing. A symlink is written through: its final target is replaced and
        the link stays. Its folder must exist.
    write : callable
        Called with a binary file object to fill.

    Returns
    -------
    pathlib.Path
        Where the file was written (a symlink's target). On any error the
        destination is untouched and no temporary file is left behind.

    Raises
    ------
    peekcore.errors.OutputPathError
        The path (or the symlink's target) is a folder, FIFO, device or socket,
        which a rename would replace by a file; or the folder is missing
        (``MissingFolderError``, a ``FileNotFoundError``).
    """
    dest = check_output_file(path)
    remove_stale_temporaries(dest)
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


def _json_value(obj: Any) -> Any:
    """numpy scalars and arrays as the JSON values they stand for; anything else refused."""
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise InvalidTypeError(
        f"cannot store {obj!r} ({type(obj).__name__}) in a peekcore file's header: metadata "
        "values must be numbers, strings, booleans, None, lists or dicts of them"
    )


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], header: dict) -> Path:
    """Write arrays and a JSON header (key ``"header"``) to one ``.npz``, atomically."""
    blob = json.dumps(header, default=_json_value).encode()
    payload = {**arrays, "header": np.frombuffer(blob, dtype=np.uint8)}
    return atomic_write(path, lambda fh: np.savez(fh, **payload))


def file_head(
    path: Path,
    size: int,
    *,
    missing: str,
    folder: str,
    error: type[Exception] = InvalidArgumentError,
) -> bytes:
    """The first ``size`` bytes of ``path``, after refusing a missing path or a folder.

    ``missing`` is the message of the ``MissingInputError`` for a path that does
    not exist; ``folder`` that of the ``error`` raised for a folder.
    """
    if not path.exists():
        raise MissingInputError(missing)
    if path.is_dir():
        raise error(folder)
    with open(path, "rb") as fh:
        return fh.read(size)


def open_npz(path: str | os.PathLike, accepted: str) -> Any:
    """``np.load(path)`` of a peekcore ``.npz`` (use as a context manager), or a clear error.

    Parameters
    ----------
    path : path-like
    accepted : str
        What the caller accepts, e.g. "a model saved by CPModel.save": the errors
        say so.

    Raises
    ------
    peekcore.errors.MissingInputError
        No such file (a ``FileNotFoundError``).
    peekcore.errors.InvalidArgumentError
        A folder (a ``ValueError``).
    peekcore.errors.FileFormatError
        A plain ``.npy`` array, a file NumPy cannot read as an ``.npz``
        archive (empty, truncated, not NumPy's), or an archive without a
        peekcore header.
    """
    path = Path(path)
    folder = f"{path} is a folder, not a peekcore file: give {accepted}"
    magic = file_head(path, 6, missing=f"no such file: {path}", folder=folder)
    if magic == b"\x93NUMPY":  # a plain .npy
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r")
            what = f" (shape {tuple(arr.shape)}, {arr.dtype})"
            del arr  # the memory map, closed before the error goes up
        except (OSError, ValueError, EOFError):
            what = ""
        raise FileFormatError(
            f"{path} is a plain NumPy array{what}, not a peekcore file: give {accepted}. "
            "To factor an array, pass it to peek fit or peek sweep (cp_als, rank_sweep)"
        )
    # checked before np.load, which leaves the file open when the archive is damaged
    if not zipfile.is_zipfile(path):
        raise FileFormatError(
            f"{path} is not a readable peekcore file (not an .npz archive: empty, cut short "
            f"or another format; an interrupted copy?): give {accepted}"
        )
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise FileFormatError(
            f"{path} is not a readable peekcore file ({type(err).__name__}: {err}): give {accepted}"
        ) from err
    if "header" not in data.files:
        data.close()
        raise FileFormatError(
            f"{path} is an .npz without a peekcore header, not a peekcore file: give {accepted}"
        )
    return data


def read_header(data: Any, path: str | os.PathLike, accepted: str) -> dict:
    """The JSON header of an archive from :func:`open_npz`, or a clear error."""
    try:
        header = json.loads(bytes(data["header"]).decode())
    except (ValueError, UnicodeDecodeError, OSError, zipfile.BadZipFile) as err:
        raise FileFormatError(
            f"{path}: unreadable peekcore header ({type(err).__name__}: {err}): give {accepted}"
        ) from err
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: its header is not a peekcore header: give {accepted}")
    return header


def load_npz(path: str | os.PathLike, fmt: str, what: str) -> tuple[dict, dict[str, Any]]:
    """Read a file written by :func:`save_npz` whose header says ``format == fmt``.

    Returns ``(header, arrays)``; refuses other files with a message naming ``what``.
    """
    accepted = f"a peekcore {what} file"
    with open_npz(path, accepted) as data:
        header = read_header(data, path, accepted)
        if header.get("format") != fmt:
            raise FileFormatError(
                f"{path} is not a peekcore {what} file (it holds {header.get('format')!r})"
            )
        try:
            arrays = {k: data[k] for k in data.files if k != "header"}
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise FileFormatError(f"{path}: a damaged {accepted} ({err})") from err
    return header, arrays
