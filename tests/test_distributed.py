"""Data-parallel fits on torch.distributed (gloo on loopback, CPU processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import peekcore
from peekcore.distributed import shard_bounds

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPT = textwrap.dedent(
    """
    import datetime, os, sys, time
    import numpy as np, torch, peekcore
    from peekcore.sweep import rank_sweep
    torch.distributed.init_process_group(
        "gloo", timeout=datetime.timedelta(seconds=float(os.environ["TIMEOUT"])))
    rank = torch.distributed.get_rank()
    x = np.load(os.environ["DATA"], mmap_mode="r")
    kind, out = os.environ["KIND"], os.environ["OUT"]
    kw = dict(n_iter_max=12, tol=0, random_state=3, chunk_size=7)
    def die(info):
        if rank == 1 and info.iteration == 2:
            os._exit(17)
    if kind == "cp":
        m = peekcore.cp_als(x, 3, init="gram", **kw)
    elif kind == "ncp":
        m = peekcore.ncp_hals(x, 3, **kw)
    elif kind == "ckpt":
        m = peekcore.ncp_hals(x, 3, checkpoint=out + ".ckpt.npz", checkpoint_every=5, **kw)
    elif kind == "sweep":
        s = rank_sweep(x, [1, 2, 3], 2, n_iter_max=12, tol=0)
        m = s.models[2][1]
    elif kind == "f32":  # float32 data, summed in float32, then in float64
        x32 = np.asarray(x, dtype=np.float32)
        m = peekcore.cp_als(x32, 3, init="gram", **kw)
        m64 = peekcore.cp_als(x32, 3, init="gram", dtype="float64", **kw)
        if rank == 0:
            m64.save(out + ".f64.npz")
    elif kind == "die":
        m = peekcore.cp_als(x, 3, callback=die, **kw)
    elif kind == "store":  # its own chunks: whole stored chunks per process
        layer = peekcore.ActivationStore(os.environ["STORE"])["0"]
        m = peekcore.cp_als(layer, 3, n_iter_max=12, tol=0, random_state=3, dtype="float64")
    if rank == 0:
        m.save(out)
    torch.distributed.destroy_process_group()
    """
)


def _launch(tmp_path, world: int, kind: str, timeout: float = 60.0, **extra: str):
    data = tmp_path / "x.npy"
    out = tmp_path / f"{kind}_{world}.npz"
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DATA=str(data),
            OUT=str(out),
            KIND=kind,
            TIMEOUT=str(timeout),
            OMP_NUM_THREADS="1",
            **extra,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True
            )
        )
    return procs, out


def _wait(procs, limit: float = 120.0):
    t0 = time.time()
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=max(1.0, limit - (time.time() - t0)))
        errs.append(err)
    return [p.returncode for p in procs], errs, time.time() - t0


def _run(tmp_path, world: int, kind: str, **extra: str):
    """Launch ``world`` workers of ``kind``, wait, and fail with their stderr unless every
    one exits 0; returns the path rank 0 saved its result to."""
    procs, out = _launch(tmp_path, world, kind, **extra)
    codes, errs, _ = _wait(procs)
    assert codes == [0] * world, errs
    return out


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(2)
    x = np.abs(rng.standard_normal((47, 6, 5)))  # 47 rows: uneven shards
    np.save(tmp_path / "x.npy", x)
    return x


def test_shard_bounds_cover_everything():
    for n, world in ((47, 2), (47, 3), (10, 4), (5, 5)):
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("n", "world", "align"), [(47, 3, 8), (48, 2, 8), (100, 3, 7), (9, 3, 4)])
def test_shard_bounds_in_whole_units(n, world, align):
    bounds = [shard_bounds(n, r, world, align) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    units = -(-n // align)
    if units >= world:  # every shard starts on a unit, unit counts differ by at most one
        assert all(lo % align == 0 for lo, _ in bounds)
        counts = [-(-(hi - lo) // align) for lo, hi in bounds]
        assert max(counts) - min(counts) <= 1 and min(counts) >= 1
    else:  # too few units (9 rows in units of 4 over 3): rows one by one
        assert bounds == [shard_bounds(n, r, world) for r in range(world)]


def test_a_shard_keeps_the_stores_chunk_size_only_on_a_boundary(tmp_path):
    from torch import nn

    from peekcore.distributed import ShardSource

    x = np.random.default_rng(0).standard_normal((40, 3, 4)).astype(np.float32)
    layer = peekcore.capture(
        nn.Sequential(nn.Identity()), x, "0", tmp_path / "s.zarr", chunk_size=8
    )["0"]
    assert ShardSource(layer, 16, 40).chunk_size == 8
    assert ShardSource(layer, 12, 40).chunk_size is None


def test_store_fit_over_three_processes_equals_one(tmp_path, data):
    from torch import nn

    store = peekcore.capture(
        nn.Sequential(nn.Identity()),
        data,
        "0",
        tmp_path / "s.zarr",
        dtype="float32",
        chunk_size=8,
    )
    out = _run(tmp_path, 3, "store", STORE=str(store.path))
    fit = dict(n_iter_max=12, tol=0, random_state=3, dtype="float64")
    want = peekcore.cp_als(store["0"], 3, **fit)  # float64 sums: equal to rounding
    got = peekcore.CPModel.load(out)
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-9)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["cp", "ncp"])
def test_equals_single_process(tmp_path, data, world, kind):
    out = _run(tmp_path, world, kind)
    got = peekcore.CPModel.load(out)
    kw = dict(n_iter_max=12, tol=0, random_state=3, chunk_size=7)
    if kind == "cp":
        want = peekcore.cp_als(data, 3, init="gram", **kw)
    else:
        want = peekcore.ncp_hals(data, 3, **kw)
    assert got.metadata["processes"] == world
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-10)
    for a, b in zip(got.factors, want.factors, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.history.fit, want.history.fit, rtol=1e-10)


def test_sweep_equals_single_process(tmp_path, data):
    out = _run(tmp_path, 2, "sweep")
    from peekcore.sweep import rank_sweep

    want = rank_sweep(data, [1, 2, 3], 2, n_iter_max=12, tol=0).models[2][1]
    np.testing.assert_allclose(peekcore.CPModel.load(out).weights, want.weights, rtol=1e-10)


def test_checkpoint_from_two_processes_resumes_in_one(tmp_path, data):
    out = _run(tmp_path, 2, "ckpt")
    kw = dict(tol=0, random_state=3, chunk_size=7)
    ckpt = str(out) + ".ckpt.npz"
    # another process count sums in another order: allowed, with a warning that says so
    with pytest.warns(RuntimeWarning, match=r"processes 2 -> 1.*not bit-identical"):
        resumed = peekcore.ncp_hals(data, 3, n_iter_max=15, resume=ckpt, **kw)  # from it. 10
    straight = peekcore.ncp_hals(data, 3, n_iter_max=15, **kw)
    np.testing.assert_allclose(resumed.weights, straight.weights, rtol=1e-10)


def test_a_dead_process_is_reported_not_hung(tmp_path, data):
    procs, _ = _launch(tmp_path, 2, "die", timeout=20.0)
    codes, errs, seconds = _wait(procs, limit=90.0)
    assert codes[1] == 17
    assert codes[0] != 0  # the survivor failed in a collective instead of hanging
    assert "PeerFailure" in errs[0] and "another process died" in errs[0]
    assert seconds < 60


def _peek_under_torchrun(*argv: str) -> None:
    """Run ``peek`` on 2 processes under torchrun (CPU, gloo); fail with its stderr."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "peekcore",
        "--json",
        *argv,
        "--distributed",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def test_peek_fit_under_torchrun(tmp_path, data):
    out = tmp_path / "m.npz"
    options = "--rank 3 --iters 6 --tol 0 --chunk-size 7".split()
    _peek_under_torchrun("fit", str(tmp_path / "x.npy"), *options, "--out", str(out))
    got = peekcore.CPModel.load(out)
    want = peekcore.cp_als(data, 3, n_iter_max=6, tol=0, chunk_size=7)
    assert got.metadata["processes"] == 2
    np.testing.assert_allclose(got.weights, want.weights, rtol=1e-10)


def test_peek_sweep_under_torchrun(tmp_path, data):
    out = tmp_path / "s.npz"
    options = "--ranks 1-3 --replicates 2 --iters 8 --tol 0".split()
    _peek_under_torchrun("sweep", str(tmp_path / "x.npy"), *options, "--out", str(out))
    from peekcore.sweep import RankSweep, rank_sweep

    got = RankSweep.load(out)
    want = rank_sweep(data, [1, 2, 3], 2, n_iter_max=8, tol=0)
    np.testing.assert_allclose(got.fit, want.fit, rtol=1e-10)
    assert got.chosen_rank == want.chosen_rank


@pytest.mark.parametrize("init", ["random", "gram"])
@pytest.mark.parametrize("method", ["cp", "ncp"])
def test_a_shards_bad_samples_are_named_by_their_index_in_the_whole_data(rng, init, method):
    """A process reads its shard from local row 0; errors must still name the sample the
    user has to fix (rank 1 of 2 used to report sample 2 for sample 5)."""
    from peekcore.distributed import ShardSource
    from peekcore.sources import as_source

    x = np.abs(rng.standard_normal((6, 3, 4)))
    x[5, 1, 2] = np.nan if method == "cp" else -1.0
    fit = peekcore.cp_als if method == "cp" else peekcore.ncp_hals
    # NaN errors name the sample itself
    why = r"NaN or Inf at sample 5:" if method == "cp" else r"negative.* samples? 5\.\.5"
    with pytest.raises(ValueError, match=why):
        fit(
            ShardSource(as_source(x), 3, 6),
            2,
            init=init,
            n_iter_max=2,
            chunk_size=1,
        )


def test_float32_differences_are_the_rounding_of_another_summation_order(tmp_path, data):
    # Two processes sum their statistics in another order than one (each shard's chunks,
    # then an all-reduce). In float32 that changes the rounding, ~1e-7 a sum, and twelve
    # ALS iterations carry it to ~1e-6 relative; the same fit accumulated in float64
    # agrees to ~1e-15, so the float32 difference is rounding and nothing else.
    out = _run(tmp_path, 2, "f32")
    kw = dict(n_iter_max=12, tol=0, random_state=3, chunk_size=7, init="gram")
    x32 = data.astype(np.float32)
    diffs = {}
    for name, path, dtype in (
        ("float32", out, None),
        ("float64", str(out) + ".f64.npz", "float64"),
    ):
        got = peekcore.CPModel.load(path)
        want = peekcore.cp_als(x32, 3, dtype=dtype, **kw)
        full = want.reconstruct()
        diffs[name] = float(np.max(np.abs(got.reconstruct() - full)) / np.max(np.abs(full)))
    print(diffs)
    assert diffs["float64"] < 1e-13
    assert diffs["float32"] < 2e-5  # float32 rounding (2.7e-7 measured), carried by the iterations
