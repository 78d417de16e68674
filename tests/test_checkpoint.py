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


@pytest.mark.slow  # a child process fitted at 0.3 s an iteration, then killed: 4-5 s
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
        peekcore.{solver}({str(data)!r}, 3, checkpoint={str(ckpt)!r}, callback=cb, **{kw!r})
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
    resumed = fit(x, 3, resume=ckpt, checkpoint=ckpt, **kw)
    straight = fit(x, 3, **kw)
    assert resumed.history.n_iter == straight.history.n_iter == 12
    np.testing.assert_array_equal(resumed.weights, straight.weights)
    for a, b in zip(resumed.factors, straight.factors, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.history.fit == straight.history.fit


def test_resume_refuses_other_settings(tmp_path):
    x = _data(tmp_path / "x.npy")
    ckpt = tmp_path / "c.npz"
    peekcore.cp_als(x, 3, n_iter_max=2, checkpoint=ckpt)
    with pytest.raises(ValueError, match="written for"):
        peekcore.cp_als(x, 4, n_iter_max=3, resume=ckpt)
    with pytest.raises(ValueError, match="written for"):
        peekcore.ncp_hals(x, 3, n_iter_max=3, resume=ckpt)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        peekcore.cp_als(x, 3, resume=tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable peekcore checkpoint"):
        peekcore.cp_als(x, 3, resume=tmp_path / "junk.npz")


def test_checkpoint_interval(tmp_path, monkeypatch):
    from peekcore.solvers import engine

    x = _data(tmp_path / "x.npy")
    written = []
    real = engine.save_checkpoint
    monkeypatch.setattr(
        engine, "save_checkpoint", lambda *a, **k: written.append(a[4]) or real(*a, **k)
    )
    peekcore.cp_als(x, 2, n_iter_max=7, tol=0, checkpoint=tmp_path / "c.npz", checkpoint_every=3)
    assert written == [3, 6]


def test_missing_checkpoint_folder_is_refused_before_the_first_pass(tmp_path):
    x = _data(tmp_path / "x.npy")
    seen = []
    for every in (1, 5):
        with pytest.raises(FileNotFoundError, match=r"folder .*missing does not exist"):
            peekcore.cp_als(
                x,
                2,
                checkpoint=tmp_path / "missing" / "fit.ckpt",
                checkpoint_every=every,
                callback=seen.append,
            )
    assert seen == []  # no pass was run (and lost)


def test_resume_from_a_model_file_says_it_is_not_a_checkpoint(tmp_path):
    x = _data(tmp_path / "x.npy")
    peekcore.cp_als(x, 2, n_iter_max=2).save(tmp_path / "model.npz")
    with pytest.raises(ValueError, match=r"not a peekcore checkpoint.*CPModel") as err:
        peekcore.cp_als(x, 2, resume=tmp_path / "model.npz")
    assert "written for" not in str(err.value)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_numpy_integer_seed_is_kept_as_an_int(tmp_path, solver):
    x = _data(tmp_path / "x.npy")
    ckpt = tmp_path / "c.npz"
    fit = SOLVERS[solver]
    kw = dict(n_iter_max=4, tol=0)
    m = fit(x, 2, random_state=np.int64(3), checkpoint=ckpt, **kw)
    assert m.metadata["random_state"] == 3 and type(m.metadata["random_state"]) is int
    m.save(tmp_path / "m.npz")
    loaded = peekcore.CPModel.load(tmp_path / "m.npz").metadata["random_state"]
    assert loaded == 3 and type(loaded) is int
    # the checkpoint's key holds the int seed: a plain-int fit resumes it
    resumed = fit(x, 2, random_state=3, resume=ckpt, **kw)
    straight = fit(x, 2, random_state=3, **kw)
    for a, b in zip(resumed.factors, straight.factors, strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_with_other_data_of_the_same_shape_is_refused(tmp_path):
    from peekcore.errors import CheckpointMismatchError

    x = _data(tmp_path / "x.npy")
    ckpt = tmp_path / "c.npz"
    kw = dict(n_iter_max=3, tol=0)
    peekcore.cp_als(x, 3, checkpoint=ckpt, **kw)
    other = np.random.default_rng(12).random(x.shape)  # differs everywhere (sampled rows too)
    with pytest.raises(CheckpointMismatchError, match=r"other data.*samples") as err:
        peekcore.cp_als(other, 3, resume=ckpt, **kw)
    assert set(err.value.differences) == {"samples"}
    # rows the fingerprint does not read: refused after the first resumed pass, by ||X||^2
    edited = x.copy()
    edited[10] *= 1.5
    seen = []
    for more in (0, 2):  # nothing left to run, or two more iterations
        with pytest.raises(CheckpointMismatchError, match=r"other data: \|\|X\|\|\^2 was"):
            peekcore.cp_als(
                edited, 3, resume=ckpt, callback=seen.append, **{**kw, "n_iter_max": 3 + more}
            )
    assert seen == []  # no iteration of a resumed fit was reported
    with pytest.raises(CheckpointMismatchError, match=r"dtype: 'float64' .* 'float32'"):
        peekcore.cp_als(x.astype(np.float32), 3, resume=ckpt, **kw)


def test_resume_refuses_another_init_and_names_it(tmp_path):
    x = _data(tmp_path / "x.npy")
    ckpt = tmp_path / "c.npz"
    peekcore.cp_als(x, 3, n_iter_max=2, init="random", checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"init: 'random' in the checkpoint, 'gram' now"):
        peekcore.cp_als(x, 3, n_iter_max=3, init="gram", resume=ckpt)


def test_resume_with_another_chunk_size_warns_and_stays_close(tmp_path):
    x = _data(tmp_path / "x.npy")
    ckpt = tmp_path / "c.npz"
    kw = dict(tol=0, random_state=2)
    peekcore.cp_als(x, 3, n_iter_max=4, chunk_size=16, checkpoint=ckpt, **kw)
    with pytest.warns(RuntimeWarning, match=r"chunk_size 16 -> 7.*not bit-identical"):
        resumed = peekcore.cp_als(x, 3, n_iter_max=8, chunk_size=7, resume=ckpt, **kw)
    straight = peekcore.cp_als(x, 3, n_iter_max=8, chunk_size=16, **kw)
    assert resumed.metadata["init"] == "random"
    np.testing.assert_allclose(resumed.history.fit, straight.history.fit, rtol=1e-12)
    np.testing.assert_allclose(resumed.reconstruct(), straight.reconstruct(), rtol=1e-9, atol=1e-12)


def test_the_fingerprint_is_the_datas_not_the_sources(tmp_path):
    import torch

    from peekcore.solvers.checkpoint import data_fingerprint
    from peekcore.sources import as_source

    x = _data(tmp_path / "x.npy")
    prints = [data_fingerprint(as_source(d)) for d in (x, tmp_path / "x.npy", torch.from_numpy(x))]
    assert prints[0] == prints[1] == prints[2]
    y = x.copy()
    y[30, 0, 0] += 1.0  # a middle sample the fingerprint reads
    assert data_fingerprint(as_source(y)) != prints[0]
