"""Argument checks (peekcore._validate) and where outputs may be written (peekcore._io)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import peekcore
from peekcore import _io
from peekcore._validate import check_int, check_output_file, check_seed, parse_ranks
from peekcore.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    MissingFolderError,
    OutputPathError,
    PeekcoreError,
)


def _model(rng: np.random.Generator) -> peekcore.CPModel:
    return peekcore.CPModel(np.ones(2), [rng.random((n, 2)) for n in (5, 4, 3)])


# ---------------------------------------------------------------- integers, seeds, ranks


@pytest.mark.parametrize("bad", [2.0, 2.5, "3", True, np.float32(2), None])
def test_integers_are_never_rounded_or_parsed(bad):
    with pytest.raises(InvalidTypeError, match="n must be a positive integer"):
        check_int(bad, "n")


def test_integers_below_minimum_are_refused_with_the_bound():
    assert check_int(np.int64(3), "n") == 3 and type(check_int(np.int64(3), "n")) is int
    assert check_int(0, "n", minimum=0) == 0
    with pytest.raises(InvalidArgumentError, match=r"got 0 \(n must be at least 1\)") as err:
        check_int(0, "n")
    assert isinstance(err.value, ValueError) and isinstance(err.value, PeekcoreError)


def test_seeds_are_nonnegative_integers_everywhere():
    assert check_seed(None) is None and check_seed(np.uint8(7)) == 7
    with pytest.raises(InvalidArgumentError, match="nonnegative"):
        check_seed(-1)
    with pytest.raises(InvalidTypeError, match="generator"):
        check_seed(np.random.default_rng(0))
    with pytest.raises(InvalidTypeError):
        check_seed(None, allow_none=False)


def test_rank_strings_parse_as_the_cli_does():
    assert parse_ranks("1-8") == list(range(1, 9))
    assert parse_ranks("2,4,8") == [2, 4, 8]
    assert parse_ranks("1-16:2") == list(range(1, 17, 2))
    assert parse_ranks("123") == [123]  # a number, not the digits 1, 2, 3
    assert parse_ranks(" 3, 1-2 ,2") == [1, 2, 3]
    for bad in ["1-3.5", "", "a", "3-1", "0-2", "1-4:0", "-2"]:
        with pytest.raises(InvalidArgumentError, match="bad rank range"):
            parse_ranks(bad)


@pytest.mark.parametrize("bad", [[2.5], [1, 2.7], ["3"], [2.0], 2.5, {3}, b"12"])
def test_rank_lists_of_non_integers_are_refused(bad):
    with pytest.raises(InvalidTypeError, match="rank"):
        parse_ranks(bad)


def test_rank_sweep_reads_ranks_through_the_same_parser(rng):
    x = rng.random((12, 5, 4))
    sweep = peekcore.rank_sweep(x, "1-3:2", 1, n_iter_max=2)
    assert sweep.ranks == [1, 3]
    assert peekcore.rank_sweep(x, np.array([2]), 1, n_iter_max=2).ranks == [2]
    for bad in ([2.5], [1, 2.7], ["3"]):
        with pytest.raises(TypeError, match="rank must be a positive integer"):
            peekcore.rank_sweep(x, bad, 1, n_iter_max=2)
    with pytest.raises(ValueError, match="bad rank range '1-3.5'"):
        peekcore.rank_sweep(x, "1-3.5", 1, n_iter_max=2)


# ---------------------------------------------------------------- output paths


def test_save_refuses_a_folder_fifo_or_device(tmp_path, rng):
    model = _model(rng)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dir.npz").mkdir()
    cases = {
        tmp_path / "pipe": "a FIFO",
        tmp_path / "dir.npz": "a folder",
        "/dev/null": "a device",
    }
    for path, kind in cases.items():
        with pytest.raises(OutputPathError, match=f"it is {kind}.*, not a regular file"):
            model.save(path)
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    assert (tmp_path / "dir.npz").is_dir() and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.npz", "pipe"]  # no temporaries


def test_save_writes_through_a_symlink_and_keeps_the_mode(tmp_path, rng):
    model = _model(rng)
    target = tmp_path / "real.npz"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    model.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    np.testing.assert_array_equal(peekcore.CPModel.load(target).weights, model.weights)
    # a symlink to a special file is refused like the file itself
    (tmp_path / "null.npz").symlink_to("/dev/null")
    with pytest.raises(OutputPathError, match=r"symlink .*null.npz.*a device"):
        model.save(tmp_path / "null.npz")


def test_reports_keep_an_existing_files_mode(tmp_path):
    from peekcore.report._common import write_file

    path = tmp_path / "r.html"
    path.write_text("old")
    os.chmod(path, 0o600)
    write_file(path, lambda fh: fh.write(b"new"))
    assert path.read_text() == "new" and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_output_checks_name_the_problem(tmp_path):
    with pytest.raises(MissingFolderError, match="folder .*nope does not exist"):
        check_output_file(tmp_path / "nope" / "m.npz")
    assert check_output_file(tmp_path / "a" / "b" / "m.npz", make_folder=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output_file(tmp_path / "file" / "m.npz", make_folder=True)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_file(ro / "m.npz")
    with pytest.raises(FileNotFoundError):  # still what older code catches
        _io.atomic_write(tmp_path / "nope" / "x", lambda fh: fh.write(b""))


def test_stale_temporaries_of_a_dead_writer_are_removed_and_no_others(tmp_path, rng):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)  # a process that has exited
    target = tmp_path / "m.npz"
    stale = tmp_path / f".m.npz.{pid}.abcd_123.tmp"
    live = tmp_path / f".m.npz.{os.getppid()}.abcd_123.tmp"  # a living process's
    other = tmp_path / f".other.npz.{pid}.abcd_123.tmp"  # another target's
    foreign = tmp_path / ".m.npz.notapid.tmp"  # not ours at all
    for p in (stale, live, other, foreign):
        p.write_bytes(b"partial")
    _model(rng).save(target)
    assert not stale.exists()
    assert live.exists() and other.exists() and foreign.exists()
    assert peekcore.CPModel.load(target).rank == 2
