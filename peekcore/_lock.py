"""One writer at a time: an advisory lock (``flock``) on a lock file beside what is written.

A capture into a store, or a fit that writes a checkpoint, holds the lock
``.NAME.lock`` beside its target (``NAME`` the store folder's or the
checkpoint's name) for the whole write; a second process that would write the
same target is refused at once with a
:class:`~peekcore.errors.ConcurrentWriteError` that names the writer (pid and
host, which the holder writes into the file). The kernel releases the lock
when its process ends, however it ends (``kill -9`` included), so a crash
never leaves a target locked. Readers take no lock.

The lock file is beside the target rather than inside it because the target
changes inode while it is written (a new store is built aside and renamed in,
an old one replaced; a checkpoint is replaced by every atomic write): one name
in the folder covers creating, resuming and replacing alike. The holder
removes the file before it lets go; whoever locks a file that was removed
meanwhile sees that (its inode is no longer the one at the path) and tries
again, so two processes never hold "the" lock on two different files. A file
left by a killed process is harmless: the next writer takes it over. Where
the file system has no ``flock`` (some network file systems), or the folder
takes no new file (a store resumed in a folder the user may not write to), the
write goes on unlocked, with a ``RuntimeWarning`` that says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

from .errors import ConcurrentWriteError, OutputPathError, RuntimeEnvironmentError

__all__ = ["lock_path", "writer_lock"]

_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}  # what flock(LOCK_NB) says when held
_NO_FILE = {errno.EACCES, errno.EPERM, errno.EROFS}  # no lock file can be made there
_ATTEMPTS = 100  # retries when the holder removed the file under us (each one a fresh holder)


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``.NAME.lock`` beside it, its symlinks resolved (so
    that two names of one target share one lock)."""
    real = Path(os.path.realpath(target))
    return real.parent / f".{real.name}.lock"


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike, what: str, wait: str) -> Iterator[Path]:
    """Hold the lock of ``target`` for the body of the ``with``; refuse if another holds it.

    Parameters
    ----------
    target : path-like
        The store folder or checkpoint file to write (need not exist yet; its
        folder must).
    what : str
        What ``target`` is, for the error ("the store", "the checkpoint").
    wait : str
        What to do instead, for the error.

    Yields
    ------
    pathlib.Path
        The lock file.

    Raises
    ------
    ConcurrentWriteError
        Another process holds the lock.
    """
    path = lock_path(target)
    fd = _acquire(path, Path(target), what, wait)
    try:
        yield path
    finally:
        if fd is not None:
            _release(path, fd)


def _acquire(path: Path, target: Path, what: str, wait: str) -> int | None:
    """A descriptor of ``path`` locked by this process (None where locks are not supported)."""
    for _ in range(_ATTEMPTS):
        fd = _open(path, target, what)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno not in _BUSY:  # no flock on this file system: write unlocked
                _warn_unlocked(path, target, what, err)
                return None
            pid, host = holder
            who = "another process" if pid is None else f"process {pid}"
            if pid is not None and host is not None and host != socket.gethostname():
                who += f" on {host}"
            raise ConcurrentWriteError(
                f"{who} is writing {what} {target} (it holds the lock {path}); two writers "
                f"would overwrite each other's work. {wait}",
                str(target),
                pid,
                host,
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:  # the holder before us removed it as it let go
            same = False
        if same:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            return fd
        os.close(fd)  # a file no longer at the path: lock the one there now
    raise RuntimeEnvironmentError(f"could not take the lock {path}: it kept being replaced")


def _open(path: Path, target: Path, what: str) -> int | None:
    """A descriptor of the lock file ``path``, made if missing; None where none can be made.

    O_NOFOLLOW and O_NONBLOCK: a symlink is not followed (it could point at any
    file, which would then be truncated) and a FIFO does not block the open.
    """
    flags = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags | os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        fd = None
        if err.errno in _NO_FILE:
            # another user's lock file (0644 under the usual umask), or a read-only file
            # system: flock needs no write access, so lock it read-only (its holder line
            # is not rewritten then)
            try:
                fd = os.open(path, flags | os.O_RDONLY)
            except OSError:  # no lock file there, and none can be made: write unlocked
                _warn_unlocked(path, target, what, err)
                return None
        elif err.errno not in (errno.EISDIR, errno.ELOOP, errno.ENXIO):
            raise
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd is not None:
        os.close(fd)
    raise OutputPathError(
        f"the lock file {path} of {what} {target} is not a regular file (a folder, symlink, "
        "FIFO or device is there): peekcore keeps a small lock file at that path while it "
        f"writes. Remove or rename {path}, then try again"
    )


def _warn_unlocked(path: Path, target: Path, what: str, err: OSError) -> None:
    """Say that ``target`` is written without the lock (another writer is not kept out)."""
    warnings.warn(
        f"writing {what} {target} without its writer lock: the lock file {path} cannot be "
        f"used ({os.strerror(err.errno) if err.errno else err}). Make sure no other process "
        "writes it at the same time",
        RuntimeWarning,
        stacklevel=4,
    )


def _holder(fd: int) -> tuple[int | None, str | None]:
    """``(pid, host)`` the holder wrote into the lock file (None, None before it did)."""
    try:
        words = os.pread(fd, 512, 0).decode(errors="replace").split()
        return int(words[0]), (words[1] if len(words) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None, None


def _release(path: Path, fd: int) -> None:
    """Remove the lock file (still ours: only its holder removes it), then let go."""
    try:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.unlink(path)
    finally:
        os.close(fd)
