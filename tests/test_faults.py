"""Faults as a user meets them: ``peek`` killed mid-capture, mid-fit and mid-write; bad paths.

Every kill is a SIGKILL at a seeded random moment (or, for the writes, inside
the write itself), and after each the test checks what the README's "What
peekcore promises" says: an output is either the complete, correct file or
absent (the previous one intact); the next run resumes to the same result as an
uninterrupted one, bit for bit; and it leaves no temporary files behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from peekcli import peek_script, run_peek

import peekcore

pytestmark = pytest.mark.slow

FIT = ["--rank", "4", "--iters", "40", "--tol", "0", "--seed", "1", "--chunk-size", "250"]


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _same_model(a: Path, b: Path) -> None:
    ma, mb = peekcore.CPModel.load(a), peekcore.CPModel.load(b)
    np.testing.assert_array_equal(ma.weights, mb.weights)
    for fa, fb in zip(ma.factors, mb.factors, strict=True):
        np.testing.assert_array_equal(fa, fb)
    assert ma.history.fit == mb.history.fit


def _kill_when(argv: list[str], cwd: Path, ready: Path, delay: float) -> int:
    """Start ``peek ARGV``; SIGKILL it ``delay`` seconds after ``ready`` appears."""
    proc = subprocess.Popen(
        [peek_script(), *argv], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return proc.returncode


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with x.npy (2,000 x 12 x 10) and the uninterrupted reference fit."""
    folder = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(16)
    x = np.abs(rng.standard_normal((2000, 12, 10))).astype(np.float32)
    np.save(folder / "x.npy", x)
    out = run_peek("fit", "x.npy", *FIT, "--out", "ref.npz", cwd=folder)
    assert out.returncode == 0, out.stderr
    return folder


def test_fit_killed_at_random_moments_resumes_bit_identically(work):
    rng = np.random.default_rng(1601)
    for case, delay in enumerate(rng.uniform(0.0, 0.3, size=2)):
        folder = work / f"kill{case}"
        folder.mkdir()
        ckpt, model = folder / "c.npz", folder / "m.npz"
        argv = ["fit", "../x.npy", *FIT, "--checkpoint", "c.npz", "--out", "m.npz"]
        code = _kill_when(argv, folder, ckpt, float(delay))
        assert code in (-signal.SIGKILL, 0)
        # complete or absent: the checkpoint resumes (its reader refuses anything cut short)
        assert ckpt.exists()
        if model.exists():
            _same_model(model, work / "ref.npz")
        out = run_peek(*argv, "--resume", "c.npz", cwd=folder)
        assert out.returncode == 0, out.stderr
        _same_model(model, work / "ref.npz")
        assert _temporaries(folder) == []


KILL_IN_WRITE = textwrap.dedent(
    """
    import os, signal, stat, sys
    import peekcore._io as io
    calls = {"n": 0}
    real = io.os.fsync
    def fsync(fd):  # a temporary is filled (not its folder's fsync): die before the rename
        calls["n"] += stat.S_ISREG(os.fstat(fd).st_mode)
        if calls["n"] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(fd)
    io.os.fsync = fsync
    from peekcore.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("write", ["checkpoint", "model"])
def test_kill_inside_a_write_keeps_the_previous_file_and_the_next_run_cleans_up(work, write):
    folder = work / f"inwrite_{write}"
    folder.mkdir()
    (folder / "kill.py").write_text(KILL_IN_WRITE)
    ckpt, model = folder / "c.npz", folder / "m.npz"
    argv = ["fit", "../x.npy", *FIT, "--checkpoint", "c.npz", "--out", "m.npz"]
    # one fsync per checkpoint (40), then one for the model: die in a seeded checkpoint
    # write, or in the model's
    kill_at = int(np.random.default_rng(1602).integers(2, 40)) if write == "checkpoint" else 41
    env = {**os.environ, "KILL_AT": str(kill_at)}
    proc = subprocess.run(
        [sys.executable, "kill.py", *argv], cwd=folder, env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(_temporaries(folder)) == 1  # the write that was cut off
    assert not model.exists()
    iteration = peekcore._io.load_npz(ckpt, "peekcore.checkpoint", "checkpoint")[0]["iteration"]
    assert iteration == kill_at - 1  # the previous checkpoint, intact
    out = run_peek(*argv, "--resume", "c.npz", cwd=folder)
    assert out.returncode == 0, out.stderr
    _same_model(model, work / "ref.npz")
    assert _temporaries(folder) == []  # the dead writer's temporary is gone


MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    """
)


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    store = peekcore.ActivationStore(path)
    store.verify()
    return {name: np.asarray(store[name].read()) for name in ("1", "2")}


def test_capture_killed_at_random_moments_resumes_to_the_same_store(work):
    folder = work / "capture"
    folder.mkdir()
    (folder / "net.py").write_text(MODEL)
    images = np.random.default_rng(17).random((1200, 1, 12, 12)).astype(np.float32)
    np.save(folder / "images.npy", images)
    argv = ["capture", "--model", "net.py:make", "--data", "images.npy", "--layers", "1,2"]
    argv += ["--batch-size", "16", "--dtype", "float32"]
    out = run_peek(*argv, "--store", "ref.zarr", cwd=folder)
    assert out.returncode == 0, out.stderr
    want = _store_arrays(folder / "ref.zarr")
    rng = np.random.default_rng(1603)
    for case, delay in enumerate(rng.uniform(0.0, 1.0, size=2)):
        store = folder / f"s{case}.zarr"
        code = _kill_when([*argv, "--store", store.name], folder, store, float(delay))
        assert code in (-signal.SIGKILL, 0)
        out = run_peek(*argv, "--store", store.name, cwd=folder)  # the same command resumes
        assert out.returncode == 0, out.stderr
        got = _store_arrays(store)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    assert _temporaries(folder) == []


def test_bad_outputs_are_refused_before_any_work(work):
    # the output is checked first: a missing data file is not even opened
    out = run_peek("fit", "missing.npy", *FIT, "--out", "nowhere/m.npz", cwd=work)
    assert out.returncode == 1 and "folder nowhere does not exist" in out.stderr
    (work / "adir.npz").mkdir(exist_ok=True)
    for argv in (
        ["sweep", "missing.npy", "--ranks", "1-2", "--out", "adir.npz"],
        ["fit", "x.npy", *FIT, "--checkpoint", "adir.npz"],
    ):
        out = run_peek(*argv, cwd=work)
        assert out.returncode == 1 and "it is a folder, not a regular file" in out.stderr
    assert not list(work.glob("adir.npz/*"))
    out = run_peek("fit", "missing.npy", *FIT, "--out", "/dev/null", cwd=work)
    assert out.returncode == 1 and "it is a device" in out.stderr
    assert Path("/dev/null").is_char_device()


def test_resume_with_other_data_is_refused_by_name(work):
    other = np.abs(np.random.default_rng(99).standard_normal((2000, 12, 10))).astype(np.float32)
    np.save(work / "other.npy", other)
    argv = [*FIT[:3], "4", *FIT[4:]]
    out = run_peek("fit", "x.npy", *argv, "--checkpoint", "a.ckpt.npz", cwd=work)
    assert out.returncode == 0, out.stderr
    out = run_peek("fit", "other.npy", *argv, "--resume", "a.ckpt.npz", cwd=work)
    assert out.returncode == 1
    assert "written for another fit (other data): samples" in out.stderr
