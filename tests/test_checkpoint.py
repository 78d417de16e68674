"""Checkpoints are atomic and a resumed fit equals an uninterrupted one, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import peekcore

SOLVERS = {"cp_als": peekcore.cp_als, "ncp_hals": peekcore.ncp_hals}


def _data(path: Path) -> np.ndarray:
    rng = np.random.default_rng(11)
    x = np.abs(rng.standard_normal((60, 9, 8)))
    np.save(path, x)
    return x


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_resume_after_kill_is_bit_identical(tmp_path, kernel, solver):
    data = tmp_path / "x.npy"
    x = _data(data)
    ckpt = tmp_path / "fit.ckpt.npz"
    kw = dict(n_iter_max=12, tol=0, random_state=5, chunk_size=16, kernel=kernel)
    script = textwrap.dedent(
        f"""
        import sys, time, peekcore
        def cb(info):
            print(info.iteration, flush=True)
            time.sleep(0.3)
        peekcore.{solver}({str(data)!r}, 3, checkpoint={str(ckpt)!r}, callback=cb,
                          progress=False, **{kw!r})
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    ) as proc:
        for line in proc.stdout:
            if int(line) >= 4:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    fit = SOLVERS[solver]
    resumed = fit(x, 3, resume=ckpt, checkpoint=ckpt, progress=False, **kw)
    straight = fit(x, 3, progress=False, **kw)
    assert resumed.history.n_iter == straight.history.n_iter == 12
    np.testing.assert_array_equal(resumed.weights, straight.weights)
    for a, b in zip(resumed.factors, straight.factors, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.history.fit == straight.history.fit


def test_resume_refuses_other_settings(tmp_path):
    x = _data(tmp_path / "x.npy")
    ckpt = tmp_path / "c.npz"
    peekcore.cp_als(x, 3, n_iter_max=2, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="written for"):
        peekcore.cp_als(x, 4, n_iter_max=3, resume=ckpt, progress=False)
    with pytest.raises(ValueError, match="written for"):
        peekcore.ncp_hals(x, 3, n_iter_max=3, resume=ckpt, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        peekcore.cp_als(x, 3, resume=tmp_path / "none.npz", progress=False)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable peekcore checkpoint"):
        peekcore.cp_als(x, 3, resume=tmp_path / "junk.npz", progress=False)


def test_checkpoint_interval(tmp_path, monkeypatch):
    from peekcore.solvers import engine

    x = _data(tmp_path / "x.npy")
    written = []
    real = engine.save_checkpoint
    monkeypatch.setattr(
        engine, "save_checkpoint", lambda *a, **k: written.append(a[4]) or real(*a, **k)
    )
    peekcore.cp_als(
        x, 2, n_iter_max=7, tol=0, checkpoint=tmp_path / "c.npz", checkpoint_every=3, progress=False
    )
    assert written == [3, 6]
