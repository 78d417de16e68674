"""Review of the session's changes (#review3): each test here failed before its fix.

The writer lock followed nothing but raised the OS's bare error for a folder or
symlink at its path and leaked a locked descriptor for a FIFO; its unlocked
fallback was silent. The estimator's repr raised for an array parameter.
Shared keyword options named only the shared ones when refusing a typo.
"""

from __future__ import annotations

import errno
import fcntl
import os
import warnings
from pathlib import Path

import pytest

from peekcore._lock import lock_path, writer_lock
from peekcore.errors import OutputPathError

# ---------------------------------------------------------------- the writer lock


def _lock_once(target: Path) -> bool:
    with writer_lock(target, "the store", "wait") as path:
        return path.is_file()


@pytest.mark.parametrize("kind", ["folder", "fifo", "symlink", "dangling symlink"])
def test_a_lock_file_that_is_no_regular_file_is_refused_and_left_alone(tmp_path, kind):
    target = tmp_path / "s.zarr"
    path = lock_path(target)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(victim)
    else:
        path.symlink_to(tmp_path / "nowhere")
    before = os.lstat(path)
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OutputPathError, match=r"not a regular file.*Remove or rename") as info:
        _lock_once(target)
    assert str(path) in str(info.value)
    assert set(os.listdir("/proc/self/fd")) <= fds  # no descriptor left open (and locked)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert victim.read_text() == "precious"
    path.unlink() if kind != "folder" else path.rmdir()
    assert _lock_once(target)  # once it is gone, the lock works


@pytest.mark.parametrize(
    ("where", "err"), [("open", errno.EROFS), ("open", errno.EACCES), ("flock", errno.ENOLCK)]
)
def test_the_unlocked_fallback_warns(tmp_path, monkeypatch, where, err):
    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os if where == "open" else fcntl, where, refuse)
    target = tmp_path / "ck.npz"
    with pytest.warns(RuntimeWarning, match=r"without its writer lock.*no other process") as rec:
        with writer_lock(target, "the checkpoint", "wait"):
            pass
    assert os.strerror(err) in str(rec[0].message) and str(target) in str(rec[0].message)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _lock_once(target)  # locked as usual: no warning
    assert not lock_path(target).exists()
