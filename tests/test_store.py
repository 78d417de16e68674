"""Activation stores: round trips, xarray, resume after a kill, refusal of damaged stores."""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_capture import SmallCNN, TinyTransformer, reference_cnn
from torch import nn

import peekcore
from peekcore import ActivationStore, capture
from peekcore.store import StoreError, to_storage

TESTS = Path(__file__).parent


def cap(model, data, layers, path, **kw):
    return capture(model, data, layers, path, **kw)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def capture_id(root: Path) -> str | None:
    return json.loads((root / "zarr.json").read_text())["attributes"]["peekcore"].get("capture_id")


def chunk_file(store_path: Path, layer: str, index: int, ndim: int) -> Path:
    return store_path.joinpath("layers", layer, "activations", "c", str(index), *["0"] * (ndim - 1))


@pytest.fixture
def images(rng):
    return rng.standard_normal((61, 1, 8, 8)).astype(np.float32)


@pytest.fixture
def digit_store(tmp_path_factory):
    """conv1 + conv2 of the small CNN on the digits, float32, chunks that do not divide N."""
    path = tmp_path_factory.mktemp("digits") / "digits.zarr"
    return cap(
        SmallCNN(),
        peekcore.datasets.digits(),
        ["conv1", "conv2"],
        path,
        dtype="float32",
        batch_size=100,
        chunk_size=250,
    )


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("chunk_size", [7, 16, 61, 100])
def test_round_trip_exact(images, tmp_path, dtype, chunk_size):
    model = SmallCNN()
    store = cap(
        model,
        images,
        ["conv1", "conv2"],
        tmp_path / "s.zarr",
        dtype=dtype,
        batch_size=16,
        chunk_size=chunk_size,
    )
    ref = reference_cnn(model, images, 16)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    assert store.chunk_size == min(chunk_size, 61)
    for name in ("conv1", "conv2"):
        layer = store[name]
        assert layer.dtype == dtype and layer.shape == (61, *ref[name].shape[1:])
        want = torch.from_numpy(ref[name]).to(tdt)
        got = torch.as_tensor(layer.read())
        if dtype == "float32":  # the hook saw the same numbers as the hand-run reference
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
        # whatever was captured reads back bit for bit, in any chunking
        for size in (1, 5, chunk_size, 200):
            parts = [torch.as_tensor(c) for c in layer.chunks(size)]
            assert [p.shape[0] for p in parts[:-1]] == [size] * (len(parts) - 1)
            assert torch.equal(torch.cat(parts), got)
        assert layer[:].dtype == (np.float16 if dtype == "float16" else np.float32)
        np.testing.assert_array_equal(np.asarray(layer)[3:9], got[3:9].float().numpy())


def test_chunk_files_are_zarrs_own_encoding(images, tmp_path):
    """Whole chunks are written without zarr's copies: the bytes must be what zarr writes."""
    zarr = pytest.importorskip("zarr")
    store = cap(
        SmallCNN(),
        (images, np.arange(61) % 3),
        "conv2",
        tmp_path / "s.zarr",
        chunk_size=16,
        batch_size=8,
    )
    keys = ["layers/conv2/activations", "sample_id", "labels"]
    before = {k: files(store.path / k) for k in keys}
    for key in keys:
        arr = zarr.open_array(store.path / key, mode="r+")
        arr[:] = arr[:]  # rewrite every chunk through zarr's codecs
    assert {k: files(store.path / k) for k in keys} == before
    assert len(before["layers/conv2/activations"]) == 1 + 4  # zarr.json + 4 chunks


def test_write_behind_starts_each_chunk_file_and_changes_no_byte(images, tmp_path, monkeypatch):
    """Every whole chunk file's writeback is started once it is complete; the bytes are the same."""
    from peekcore.store import chunkfile as store_mod

    started: list[int] = []
    real = store_mod._start_writeback

    def counting(fd: int) -> bool:
        started.append(os.fstat(fd).st_size)
        return real(fd)

    monkeypatch.setattr(store_mod, "_start_writeback", counting)
    kw = dict(dtype="float16", batch_size=8, chunk_size=16)
    data = (images, np.arange(61) % 3)
    on = cap(SmallCNN(), data, ["conv1", "conv2"], tmp_path / "on.zarr", **kw)
    # 3 whole chunks of 16 (the last, partial one goes through zarr) of two layers and labels
    chunk_bytes = {16 * math.prod(on[n].shape[1:]) * 2 + 4 for n in on} | {16 * 8 + 4}
    assert len(started) == 3 * 3 and set(started) == chunk_bytes
    started.clear()
    monkeypatch.setattr(store_mod, "WRITE_BEHIND", False)
    off = cap(SmallCNN(), data, ["conv1", "conv2"], tmp_path / "off.zarr", **kw)
    assert started == []
    assert files(on.path) == files(off.path)
    on.verify()


def test_start_writeback_is_a_hint(tmp_path):
    """True where Linux started the writeback; never an error (False elsewhere or on pipes)."""
    from peekcore.store.chunkfile import _start_writeback

    path = tmp_path / "f"
    with open(path, "wb") as fh:
        fh.write(b"x" * 100_000)
        fh.flush()
        started = _start_writeback(fh.fileno())
    assert started == sys.platform.startswith("linux")
    r, w = os.pipe()
    try:
        assert _start_writeback(w) is False  # ESPIPE: refused, not raised
    finally:
        os.close(r)
        os.close(w)


def test_shards_read_only_their_rows(digit_store):
    layer = digit_store["conv2"]
    whole = layer[:]
    shard = layer.shard(240, 1010)  # starts inside a chunk, ends inside another
    assert isinstance(shard, peekcore.ChunkSource) and shard.shape == (770, 10, 8, 8)
    for size in (None, 100, 250):
        np.testing.assert_array_equal(np.concatenate(list(shard.chunks(size))), whole[240:1010])
    np.testing.assert_array_equal(shard[5], whole[245])
    np.testing.assert_array_equal(shard[-3:, 2], whole[1007:1010, 2])
    np.testing.assert_array_equal(shard[::-100], whole[240:1010][::-100])
    np.testing.assert_array_equal(shard[..., 0], whole[240:1010, ..., 0])
    np.testing.assert_array_equal(shard[[0, 3]], whole[[240, 243]])
    inner = shard.shard(10, 20)
    np.testing.assert_array_equal(inner.read(), whole[250:260])
    assert inner.to_xarray().shape == (10, 10, 8, 8)
    with pytest.raises(ValueError, match="not within"):
        layer.shard(5, 5000)
    with pytest.raises(IndexError):
        shard[770]


def test_reopened_store_has_everything(digit_store):
    store = ActivationStore(digit_store.path)
    assert store.layers == ("conv1", "conv2") and list(store) == ["conv1", "conv2"]
    assert "conv2" in store and len(store) == 2
    assert store.n_samples == 1797 and store.chunk_size == 250 and store.dtype == "float32"
    np.testing.assert_array_equal(store.labels, peekcore.datasets.digits().labels)
    np.testing.assert_array_equal(store.sample_ids, np.arange(1797))
    prov = store.provenance
    assert prov["model_class"] == "test_capture.SmallCNN"
    assert len(prov["weights_sha256"]) == 64
    assert prov["data_source"].startswith("sklearn digits")
    assert prov["seed"] == 0 and prov["transform"] is None
    assert set(prov["versions"]) >= {"peekcore", "torch", "numpy", "zarr"}
    attrs = store["conv2"].attrs
    assert attrs["layer"] == "conv2" and attrs["module"] == "Conv2d"
    assert attrs["weights_sha256"] == prov["weights_sha256"]
    with pytest.raises(KeyError, match=r"no layer 'fc'.*\['conv1', 'conv2'\]"):
        store["fc"]
    assert "n_samples=1797" in repr(store) and "conv2" in repr(store["conv2"])


def test_opens_with_xarray(digit_store):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(digit_store.path, group="layers/conv2", consolidated=False)
    assert ds["activations"].dims == ("sample", "channel", "y", "x")
    np.testing.assert_array_equal(ds["activations"].values, digit_store["conv2"][:])
    da = digit_store.to_xarray("conv2")
    assert da.dims == ("sample", "channel", "y", "x") and da.name == "conv2"
    np.testing.assert_array_equal(da["label"].values, digit_store.labels)
    np.testing.assert_array_equal(da.isel(sample=slice(5, 8)).values, digit_store["conv2"][5:8])
    assert da.attrs["layer"] == "conv2" and "weights_sha256" in da.attrs
    root = xr.open_zarr(digit_store.path, consolidated=False)
    np.testing.assert_array_equal(root["labels"].values, digit_store.labels)


def test_token_store_dims(rng, tmp_path):
    x = rng.standard_normal((10, 5, 8)).astype(np.float32)
    store = cap(TinyTransformer(), x, "blocks.0.mlp.0", tmp_path / "t.zarr")
    da = store.to_xarray("blocks.0.mlp.0")
    assert da.dims == ("sample", "channel", "token") and da.shape == (10, 12, 5)


# ---------------------------------------------------------------- fits on stores


def test_fit_on_store_equals_fit_in_memory(digit_store):
    layer = digit_store["conv2"]
    assert isinstance(layer, peekcore.ChunkSource)
    x = layer[:]
    assert x.dtype == np.float32
    kw = dict(n_iter_max=6, tol=0.0, random_state=7, chunk_size=300)
    on_disk = peekcore.cp_als(layer, 5, **kw)
    in_memory = peekcore.cp_als(x, 5, **kw)
    np.testing.assert_allclose(on_disk.weights, in_memory.weights, rtol=1e-12, atol=0)
    for a, b in zip(on_disk.factors, in_memory.factors, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_solvers_read_whole_stored_chunks(digit_store, monkeypatch):
    layer = digit_store["conv2"]
    cs = layer.chunk_size
    row = layer.nbytes // layer.shape[0]
    # without a chunk size: the largest multiple of the stored chunks in the budget
    for budget, want in ((3 * cs * row + 5, 3 * cs), (cs * row // 2, cs)):
        fit = peekcore.cp_als(layer, 2, n_iter_max=1, max_chunk_bytes=budget)
        assert fit.metadata["chunk_size"] == min(want, layer.shape[0])
    # the default budget on the CPU: stored chunks of at least NATURAL_CHUNK_ALONE_BYTES are
    # read alone (mapped, no copy), smaller ones grouped up to the budget
    from peekcore.solvers import problem

    for alone, alone_ok in ((cs * row, True), (cs * row + 1, False)):
        monkeypatch.setattr(problem, "NATURAL_CHUNK_ALONE_BYTES", alone)
        fit = peekcore.cp_als(layer, 2, n_iter_max=1)
        assert (fit.metadata["chunk_size"] == cs) == alone_ok
    # a chunk size that is not a multiple reads whole chunks too, and cuts them
    got = list(layer.chunks(cs + 3))
    assert [len(c) for c in got[:-1]] == [cs + 3] * (len(got) - 1)
    np.testing.assert_array_equal(np.concatenate(got), layer[:])


def test_fit_on_half_stores(images, tmp_path):
    for dtype in ("float16", "bfloat16"):
        store = cap(
            SmallCNN(), images, "conv2", tmp_path / f"{dtype}.zarr", dtype=dtype, chunk_size=20
        )
        kw = dict(n_iter_max=3, tol=0.0, random_state=1, chunk_size=20)
        got = peekcore.cp_als(store["conv2"], 3, **kw)
        ref = peekcore.cp_als(torch.as_tensor(store["conv2"].read()), 3, **kw)
        np.testing.assert_allclose(got.weights, ref.weights, rtol=1e-12)


# ---------------------------------------------------------------- resume


class SleepyCNN(SmallCNN):
    """SmallCNN that sleeps in every forward, to be killed mid-capture."""

    sleep = 0.0
    calls = 0

    def forward(self, x):
        SleepyCNN.calls += 1
        time.sleep(self.sleep)
        return super().forward(x)


def resume_job(path: str, sleep: float) -> ActivationStore:
    """The capture the resume test kills and reruns (also run in a subprocess)."""
    model = SleepyCNN(seed=4)
    model.sleep = sleep
    rng = np.random.default_rng(11)
    x = rng.standard_normal((203, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 203)
    return cap(
        model, (x, y), ["conv1", "conv2"], path, dtype="float16", batch_size=8, chunk_size=20
    )


def progress_of(path: Path) -> dict | None:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["progress"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow  # a capture killed in a child process, resumed here: 6 s
def test_resume_after_kill_gives_the_same_store(tmp_path):
    killed = tmp_path / "killed.zarr"
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_store; "
        f"test_store.resume_job({str(killed)!r}, 0.15)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            p = progress_of(killed)
            if p is not None and p["chunks_written"] >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        else:
            pytest.fail("the capture subprocess wrote no chunks within 60 s")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stderr.close()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    p = progress_of(killed)
    assert 2 <= p["chunks_written"] < p["n_chunks"] == 11
    with pytest.raises(StoreError, match=r"incomplete: \d+ of 11 chunks.*same peekcore.capture"):
        ActivationStore(killed)
    # a write cut short leaves zarr's temporary file: the resume removes it
    (killed / "layers" / "conv1" / "activations" / "c").mkdir(parents=True, exist_ok=True)
    leftover = killed / "layers" / "conv1" / "activations" / "c" / f"9.{'ab' * 16}.partial"
    leftover.write_bytes(b"junk")

    SleepyCNN.calls = 0
    resumed = resume_job(str(killed), 0.0)
    resumed_calls, SleepyCNN.calls = SleepyCNN.calls, 0
    fresh = resume_job(str(tmp_path / "fresh.zarr"), 0.0)
    assert resumed_calls <= SleepyCNN.calls - 5  # 20-sample chunks, batches of 8
    assert not leftover.exists()
    assert files(resumed.path) == files(fresh.path)
    for name in ("conv1", "conv2"):
        assert torch.equal(
            torch.as_tensor(resumed[name].read()), torch.as_tensor(fresh[name].read())
        )
    resumed.verify()


class Failing(SmallCNN):
    """Raises in its forward after ``budget`` calls, like a process that dies."""

    budget = -1

    def forward(self, x):
        if Failing.budget == 0:
            raise KeyboardInterrupt
        Failing.budget -= 1
        return super().forward(x)


@pytest.mark.parametrize("kind", ["array", "dataset", "loader"])
def test_interrupted_capture_resumes_to_the_same_store(images, tmp_path, kind):
    """Batches of 10, chunks of 16: a resume restarts inside a batch."""
    from torch.utils.data import DataLoader, TensorDataset

    labels = np.arange(61) % 4
    data = {
        "array": (images, labels),
        "dataset": TensorDataset(torch.from_numpy(images), torch.from_numpy(labels)),
        "loader": DataLoader(
            TensorDataset(torch.from_numpy(images), torch.from_numpy(labels)), batch_size=10
        ),
    }[kind]
    kw = dict(dtype="bfloat16", batch_size=10, chunk_size=16)
    path = tmp_path / "s.zarr"
    Failing.budget = 4
    with pytest.raises(KeyboardInterrupt):
        cap(Failing(), data, ["conv1", "conv2"], path, **kw)
    assert progress_of(path)["chunks_written"] == 2  # 40 samples ran: 2 whole chunks
    started = capture_id(path)
    Failing.budget = -1
    resumed = cap(Failing(), data, ["conv1", "conv2"], path, **kw)
    fresh = cap(Failing(), data, ["conv1", "conv2"], tmp_path / "fresh.zarr", **kw)
    assert files(resumed.path) == files(fresh.path)
    assert capture_id(path) == started == capture_id(fresh.path)  # the same capture
    np.testing.assert_array_equal(resumed.labels, labels)


class Counting(SmallCNN):
    calls = 0

    def forward(self, x):
        Counting.calls += 1
        return super().forward(x)


def test_rerun_of_a_complete_capture_does_no_work(images, tmp_path):
    path = tmp_path / "s.zarr"
    first = cap(Counting(), images, "conv2", path, batch_size=16)
    before = files(path)
    Counting.calls = 0
    again = cap(Counting(), images, "conv2", path, batch_size=16)
    assert Counting.calls == 0
    assert files(path) == before and again.n_samples == first.n_samples


def test_resume_with_other_settings_is_refused(images, tmp_path):
    path = tmp_path / "s.zarr"
    cap(SmallCNN(), images, "conv2", path, batch_size=16, chunk_size=10)
    with pytest.raises(
        StoreError, match=r"(?s)other settings.*batch_size: store has 16, this call 8"
    ):
        cap(SmallCNN(), images, "conv2", path, batch_size=8)
    with pytest.raises(StoreError, match="weights_sha256"):
        cap(SmallCNN(seed=1), images, "conv2", path, batch_size=16)
    with pytest.raises(StoreError, match="data_fingerprint"):
        cap(SmallCNN(), images + 1, "conv2", path, batch_size=16)
    with pytest.raises(StoreError, match="chunk_size: store has 10, this call 12"):
        cap(SmallCNN(), images, "conv2", path, batch_size=16, chunk_size=12)
    store = cap(SmallCNN(), images, "conv2", path, batch_size=8, overwrite=True)
    assert store.attrs["settings"]["batch_size"] == 8


def test_overwrite_refuses_folders_that_are_not_stores(images, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a peekcore activation store"):
        cap(SmallCNN(), images, "conv2", tmp_path / "mine", overwrite=True)
    with pytest.raises(StoreError, match="not a zarr store"):
        cap(SmallCNN(), images, "conv2", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- damaged stores


@pytest.fixture
def small_store(images, tmp_path):
    return cap(
        SmallCNN(), images, ["conv1", "conv2"], tmp_path / "s.zarr", dtype="float32", chunk_size=16
    )


def test_missing_chunk_is_refused(small_store):
    chunk_file(small_store.path, "conv2", 2, 4).unlink()
    with pytest.raises(
        StoreError,
        match=r"layer 'conv2' is missing 1 of 4 chunk files: chunk 2 "
        r"\(samples 32..47\)",
    ):
        ActivationStore(small_store.path)
    with pytest.raises(StoreError, match="missing 1 of 4"):
        small_store.verify()


def test_corrupt_chunk_is_refused(small_store):
    path = chunk_file(small_store.path, "conv1", 1, 4)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    store = ActivationStore(small_store.path)  # files present: opens
    with pytest.raises(StoreError, match=r"samples 16\.\.31 of layer 'conv1'.*corrupt"):
        list(store["conv1"].chunks(16))
    with pytest.raises(StoreError, match="failed verification"):
        store.verify()
    with pytest.raises(StoreError, match="checksum"):
        store["conv1"][20]
    path.write_bytes(bytes(raw[:50]))  # truncated
    with pytest.raises(StoreError, match="corrupt"):
        store["conv1"].read(16, 32)


def opens_direct(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except (AttributeError, OSError):
        return False
    return True


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_direct_reads_equal_buffered_reads(images, tmp_path, dtype):
    store = cap(SmallCNN(), images, ["conv1"], tmp_path / "s.zarr", dtype=dtype, chunk_size=16)
    direct = ActivationStore(store.path, read_mode="direct")
    buffered = ActivationStore(store.path, read_mode="buffered")
    assert direct["conv1"]._uncached == hasattr(os, "O_DIRECT")
    assert not buffered["conv1"]._uncached
    got = [np.asarray(c.float() if hasattr(c, "float") else c) for c in direct["conv1"].chunks()]
    want = [np.asarray(c.float() if hasattr(c, "float") else c) for c in buffered["conv1"].chunks()]
    assert [c.shape[0] for c in got] == [16, 16, 16, 13]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    if opens_direct(chunk_file(store.path, "conv1", 0, 4)):  # not on tmpfs, say
        assert direct["conv1"]._uncached  # the whole chunks really took the O_DIRECT path
    with pytest.raises(ValueError, match="read_mode must be one of"):
        ActivationStore(store.path, read_mode="mmap")


def buffered_reads(monkeypatch, how: str) -> dict[str, int]:
    """Make buffered chunk reads go through mappings (``"mapped"``) or ``read`` (``"read"``).

    Returns counts of the chunks copied out of a mapping (``"copy"``, what
    ``read()`` does) and of those handed out as mappings (``"map"``, what
    ``chunks()`` does), and of the CRC32C checks (``"crc"``).
    """
    from peekcore.store import chunkfile as store_mod

    counts = {"copy": 0, "map": 0, "crc": 0}
    copy, map_file, check = (
        store_mod._copy_mapped,
        store_mod._map_chunk_file,
        store_mod._check_chunk_bytes,
    )

    def copying(fd, raw):
        counts["copy"] += 1
        return copy(fd, raw)

    def mapping(*args):
        arr = map_file(*args)
        counts["map"] += arr is not None
        return arr

    def checking(*args):
        counts["crc"] += 1
        return check(*args)

    monkeypatch.setattr(store_mod, "_copy_mapped", copying)
    monkeypatch.setattr(store_mod, "_map_chunk_file", mapping)
    monkeypatch.setattr(store_mod, "_check_chunk_bytes", checking)
    monkeypatch.setattr(store_mod, "_MAP_MIN_BYTES", 0)  # the test chunks are small
    if how == "read":
        monkeypatch.setattr(store_mod, "_MAP_READS", False)
    return counts


def map_reads() -> bool:
    from peekcore.store import chunkfile as store_mod

    return store_mod._MAP_READS


@pytest.mark.parametrize("how", ["mapped", "read"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_buffered_reads_mapped_or_read_equal_zarrs_reads(images, tmp_path, dtype, how, monkeypatch):
    zarr = pytest.importorskip("zarr")
    store = cap(SmallCNN(), images, ["conv1"], tmp_path / "s.zarr", dtype=dtype, chunk_size=16)
    want = zarr.open_array(store.path / "layers" / "conv1" / "activations", mode="r")[:]
    counts = buffered_reads(monkeypatch, how)
    layer = ActivationStore(store.path, read_mode="buffered")["conv1"]
    got = [to_storage(torch.as_tensor(c)) for c in layer.chunks()]
    assert [len(c) for c in got] == [16, 16, 16, 13]
    np.testing.assert_array_equal(np.concatenate(got), want)
    np.testing.assert_array_equal(to_storage(torch.as_tensor(layer.read(0, 48))), want[:48])
    mapped = how == "mapped" and map_reads()
    # chunks(): the three whole chunk files as mappings, the padded last one copied out of
    # its file (read whole, then cut); read(): copies of the three
    assert (counts["map"], counts["copy"]) == ((3, 4) if mapped else (0, 0))


def test_mapped_chunks_are_private_copies_on_write(images, tmp_path, monkeypatch):
    store = cap(SmallCNN(), images, ["conv1"], tmp_path / "s.zarr", dtype="float32", chunk_size=16)
    before = files(store.path)
    counts = buffered_reads(monkeypatch, "mapped")
    layer = ActivationStore(store.path, read_mode="buffered")["conv1"]
    first = next(iter(layer.chunks()))
    want = np.array(first)
    first *= -2.0  # numpy writes
    torch.as_tensor(first).add_(1.0)  # and torch writes, through the same memory
    np.testing.assert_array_equal(first, want * -2.0 + 1.0)
    assert files(store.path) == before  # nothing reached the files
    np.testing.assert_array_equal(next(iter(layer.chunks())), want)
    assert (counts["map"] > 0) == map_reads()


@pytest.mark.parametrize("how", ["mapped", "read"])
def test_checksums_are_checked_once_per_unchanged_file(small_store, how, monkeypatch):
    counts = buffered_reads(monkeypatch, how)
    store = ActivationStore(small_store.path, read_mode="buffered")
    layer = store["conv1"]
    for _ in range(3):
        assert sum(len(c) for c in layer.chunks()) == 61
    assert counts["crc"] == 4  # the four chunk files (the last one padded), once each
    assert sum(len(c) for c in layer.shard(16, 48).chunks()) == 32  # shards share the record
    assert counts["crc"] == 4
    path = chunk_file(small_store.path, "conv1", 1, 4)
    good, times = path.read_bytes(), path.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity
    path.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])  # same size
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))  # even with the old mtime
    with pytest.raises(StoreError, match=r"samples 16\.\.31 of layer 'conv1'.*checksum"):
        list(layer.chunks())
    path.write_bytes(good)
    assert sum(len(c) for c in layer.chunks()) == 61
    with pytest.raises(StoreError, match="missing"):  # verify() checks everything again
        chunk_file(small_store.path, "conv1", 2, 4).unlink()
        store.verify()


@pytest.mark.parametrize("how", ["direct", "mapped", "read"])
def test_reads_refuse_corrupt_truncated_and_longer_chunks(small_store, how, monkeypatch):
    path = chunk_file(small_store.path, "conv1", 1, 4)
    good = path.read_bytes()
    if how != "direct":
        counts = buffered_reads(monkeypatch, how)
    store = ActivationStore(small_store.path, read_mode="direct" if how == "direct" else "buffered")
    for bad, why in (
        (good[:100] + bytes([good[100] ^ 0xFF]) + good[101:], "checksum"),
        (good[:-7], "does not hold"),
        (good + b"\0", "does not hold"),
        (good[:-1] + bytes([good[-1] ^ 0x01]), "checksum"),  # the stored CRC itself
    ):
        path.write_bytes(bad)
        with pytest.raises(StoreError, match=rf"samples 16\.\.31 of layer 'conv1'.*{why}"):
            store["conv1"].read(16, 32)  # chunk 1 alone, no reads ahead
        with pytest.raises(StoreError, match=rf"samples 16\.\.31 of layer 'conv1'.*{why}"):
            list(store["conv1"].chunks(16))
    if how == "mapped" and map_reads():
        # read(): the two damaged files of the right size; chunks(): the padded last chunk,
        # read ahead (and copied out of its file) each of the four times
        assert counts["copy"] == 2 + 4
        assert counts["map"] >= 2  # chunks(): those two again, and chunk 0 maybe


def test_auto_read_mode_bypasses_the_cache_only_for_layers_larger_than_memory(
    small_store, monkeypatch
):
    from peekcore.store import chunkfile as store_mod

    nbytes = small_store["conv1"].nbytes
    monkeypatch.setattr(store_mod, "_available_memory", lambda: 4 * nbytes)
    assert not ActivationStore(small_store.path)["conv1"]._uncached
    monkeypatch.setattr(store_mod, "_available_memory", lambda: nbytes)
    assert ActivationStore(small_store.path)["conv1"]._uncached == hasattr(os, "O_DIRECT")


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_metadata_that_disagrees_with_arrays_is_refused(small_store):
    root = small_store.path
    edit_json(
        root / "zarr.json", lambda m: m["attributes"]["layers"]["conv2"]["shape"].__setitem__(0, 11)
    )
    with pytest.raises(
        StoreError,
        match=r"layer 'conv2' has shape \(61, 10, 8, 8\) but the "
        r"metadata says \(61, 11, 8, 8\)",
    ):
        ActivationStore(root)
    edit_json(
        root / "zarr.json", lambda m: m["attributes"]["layers"]["conv2"]["shape"].__setitem__(0, 10)
    )
    ActivationStore(root)
    edit_json(root / "zarr.json", lambda m: m["attributes"].__setitem__("dtype", "float16"))
    with pytest.raises(StoreError, match="stored as float32 but the metadata says float16"):
        ActivationStore(root)
    edit_json(root / "zarr.json", lambda m: m["attributes"].__setitem__("dtype", "float32"))
    edit_json(
        root / "zarr.json",
        lambda m: m["attributes"]["layers"].__setitem__(
            "conv9", {"shape": [1], "dims": ["sample"]}
        ),
    )
    with pytest.raises(StoreError, match="lists layer 'conv9' but there is no array"):
        ActivationStore(root)


def test_not_a_store(tmp_path):
    zarr = pytest.importorskip("zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(StoreError, match="not a peekcore activation store"):
        ActivationStore(tmp_path / "plain.zarr")
    with pytest.raises(FileNotFoundError, match="no activation store"):
        ActivationStore(tmp_path / "nothing.zarr")
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="damaged"):
        ActivationStore(tmp_path / "broken.zarr")


def test_verify_finds_nan_and_inf(images, tmp_path):
    x = images.copy()
    x[37, 0, 2, 2] = np.nan
    x[50, 0, 1, 1] = 1e6  # overflows float16
    model = nn.Sequential(nn.Identity())
    with pytest.raises(ValueError, match="NaN or Inf for the batch starting at sample 32"):
        cap(model, x, "0", tmp_path / "refused.zarr", batch_size=16)
    store = cap(model, x, "0", tmp_path / "s.zarr", batch_size=16, check_finite=False)
    with pytest.raises(
        StoreError,
        match=r"layer '0' holds 2 NaN/Inf values \(first in sample "
        r"37\).*dtype='bfloat16'",
    ):
        store.verify()
    clean = cap(model, images, "0", tmp_path / "c.zarr", batch_size=16)
    report = clean.verify()
    assert report["layers"]["0"] == {"shape": (61, 1, 8, 8), "dtype": "float16", "nonfinite": 0}


def test_chunks_are_read_when_a_file_cannot_be_mapped(small_store, monkeypatch):
    """mmap failing (strict overcommit, too many mappings) falls back to reading the file."""
    from peekcore.store import chunkfile as store_mod

    want = [np.array(c) for c in ActivationStore(small_store.path)["conv1"].chunks()]
    counts = buffered_reads(monkeypatch, "mapped")

    def refused(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(store_mod.mmap, "mmap", refused)
    got = list(ActivationStore(small_store.path, read_mode="buffered")["conv1"].chunks())
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert counts["map"] == 0 and counts["crc"] == 4  # all four chunk files, read
    layer = ActivationStore(small_store.path, read_mode="buffered")["conv1"]
    np.testing.assert_array_equal(layer.read(0, 48), np.concatenate(want[:3]))  # read() too


# ---------------------------------------------------------------- reading by index


def as_array(x) -> np.ndarray:
    """A read as float32 numpy (bfloat16 tensors too)."""
    return torch.as_tensor(x).float().numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_read_takes_start_and_stop_as_python_slicing_does(images, tmp_path, rng, dtype):
    store = cap(SmallCNN(), images, "conv1", tmp_path / "s.zarr", dtype=dtype, chunk_size=7)
    layer = store["conv1"]
    full = as_array(layer.read())
    assert full.shape == (61, 6, 8, 8)
    # whole stored chunks (multiples of 7) are read without zarr: negatives and start > stop
    cases = [(-14, None), (14, 7), (-21, -7), (7, 14), (0, 0), (56, 300)]
    cases += [(-2, None), (-3, -1), (-100, 5), (12, 300), (5, 3), (4, 2), (61, None), (-61, -60)]
    cases += [tuple(int(v) for v in pair) for pair in rng.integers(-90, 90, size=(30, 2))]
    cases += [(None, -50), (None, None)]
    # shards read only their rows, whatever start and stop say
    for source, rows in (
        (layer, full),
        (layer.shard(10, 40), full[10:40]),
        (layer.shard(14, 28), full[14:28]),
    ):
        for start, stop in cases:
            got = as_array(source.read(start, stop))
            want = rows[start:stop]
            assert got.shape == want.shape == (len(range(len(rows))[start:stop]), 6, 8, 8)
            np.testing.assert_array_equal(got, want, err_msg=f"read({start}, {stop})")


def numpy_key(key):
    """``key`` with torch tensors as numpy arrays: the reference indexes a numpy array."""
    if isinstance(key, tuple):
        return tuple(numpy_key(k) for k in key)
    return key.numpy() if isinstance(key, torch.Tensor) else key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_indexing_is_numpys_indexing_of_the_whole_array(images, tmp_path, rng, dtype):
    store = cap(SmallCNN(), images, "conv1", tmp_path / "s.zarr", dtype=dtype, chunk_size=7)
    layer = store["conv1"]
    for source, full in ((layer, as_array(layer.read())), (layer.shard(9, 40), None)):
        full = as_array(source.read()) if full is None else full
        n, c = source.shape[:2]
        keys = [
            np.array(3),  # 0-d integer arrays and tensors index like ints
            torch.tensor(3),
            np.array(-5),
            np.int64(-2),
            (torch.tensor(2), 1),
            (np.array(4), Ellipsis, np.array(0)),
            (slice(None), np.array(2), torch.tensor(-1)),
            torch.tensor([1, -2, 5]),
            [[0, 1], [-1, 2]],
            rng.random(n) < 0.3,  # masks of one and more dimensions
            rng.random((n, c)) > 0.5,
            torch.from_numpy(rng.random((n, c)) > 0.5),
            full > 0,
            (None, rng.random(n) < 0.3),
            (slice(None), rng.random(c) > 0.5),
            (rng.random((n, c)) > 0.5, 3),
            np.bool_(True),
            (slice(-3, None), Ellipsis, 1),
        ]
        for key in keys:
            want = full[numpy_key(key)]
            got = source[key]
            assert got.shape == want.shape, key
            np.testing.assert_array_equal(got, want, err_msg=repr(key))
        got = source[source[...] > 0]  # a mask made from the layer itself
        np.testing.assert_array_equal(got, full[full > 0])
    # only the rows a mask selects are read
    reads = []
    read = layer._read
    layer._read = lambda lo, hi, *a: reads.append((lo, hi)) or read(lo, hi, *a)
    mask = np.zeros(layer.shape[:2], bool)
    mask[20, 1] = mask[25, 4] = True
    np.testing.assert_array_equal(layer[mask], as_array(layer.read())[mask])
    assert reads[0] == (20, 26)


# ---------------------------------------------------------------- stores captured again


@pytest.mark.parametrize("how", ["mapped", "read"])
def test_open_store_refuses_to_read_once_captured_again(images, tmp_path, how, monkeypatch):
    buffered_reads(monkeypatch, how)
    path = tmp_path / "s.zarr"
    kw = dict(dtype="float32", batch_size=8, chunk_size=8)
    labels = np.arange(61) % 5
    cap(SmallCNN(), (images, labels), "conv1", path, **kw)
    old = ActivationStore(path, read_mode="buffered")
    old_data = as_array(old["conv1"].read())
    np.testing.assert_allclose(old_data, reference_cnn(SmallCNN(), images, 8)["conv1"], atol=1e-6)
    passing = old["conv1"].chunks()  # a pass begun before the store is captured again
    np.testing.assert_array_equal(next(passing), old_data[:8])
    new = cap(SmallCNN(seed=1), (images, labels), "conv1", path, overwrite=True, **kw)
    new_data = as_array(new["conv1"].read())
    assert not np.allclose(new_data, old_data)
    replaced = rf"the store at {path} was replaced or changed since it was opened.*open it again"
    with pytest.raises(StoreError, match=replaced):
        list(passing)
    with pytest.raises(StoreError, match=replaced):
        old["conv1"].read(0, 8)
    with pytest.raises(StoreError, match=replaced):
        old["conv1"].read(56, 61)  # the partial last chunk, read through zarr
    with pytest.raises(StoreError, match=replaced):
        old["conv1"][3]
    with pytest.raises(StoreError, match=replaced):
        old["conv1"].shard(8, 16).read()
    with pytest.raises(StoreError, match=replaced):
        _ = old.labels
    with pytest.raises(StoreError, match=replaced):
        old.verify()
    np.testing.assert_array_equal(as_array(ActivationStore(path)["conv1"].read()), new_data)
    # removed, or captured again with other chunks: the same
    import shutil

    shutil.rmtree(path)
    with pytest.raises(StoreError, match=replaced):
        new["conv1"].read()


def test_open_store_reads_on_while_the_store_is_the_same_capture(images, tmp_path):
    zarr = pytest.importorskip("zarr")
    path = tmp_path / "s.zarr"
    kw = dict(dtype="float32", batch_size=8, chunk_size=16)
    opened = cap(SmallCNN(), images, "conv2", path, **kw)
    want = as_array(opened["conv2"].read())
    again = cap(SmallCNN(), images, "conv2", path, **kw)  # the same arguments: nothing to do
    time.sleep(0.05)  # past the file system's timestamp granularity
    zarr.open_group(path, mode="r+").attrs.update({"note": "mine"})  # metadata rewritten
    np.testing.assert_array_equal(as_array(opened["conv2"].read()), want)
    np.testing.assert_array_equal(np.concatenate(list(opened["conv2"].chunks())), want)
    opened.verify()
    fit = dict(n_iter_max=3, tol=0.0, random_state=2)
    np.testing.assert_allclose(
        peekcore.cp_als(opened["conv2"], 2, **fit).weights,
        peekcore.cp_als(again["conv2"], 2, **fit).weights,
    )
    # a store made before capture ids: any change of its root metadata counts
    edit_json(path / "zarr.json", lambda m: m["attributes"]["peekcore"].pop("capture_id", None))
    legacy = ActivationStore(path)
    np.testing.assert_array_equal(as_array(legacy["conv2"].read()), want)
    time.sleep(0.05)
    edit_json(path / "zarr.json", lambda m: m["attributes"].__setitem__("note", "changed"))
    with pytest.raises(StoreError, match="replaced or changed since it was opened"):
        legacy["conv2"].read()


def test_overwrite_keeps_the_old_store_until_the_new_capture_has_run(images, tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    kw = dict(dtype="float32", batch_size=8, chunk_size=16)
    old = cap(SmallCNN(), images, ["conv1", "conv2"], path, **kw)
    before, first_id = files(path), capture_id(path)
    with pytest.raises(ValueError, match="needs a 3-way token output"):
        cap(SmallCNN(seed=1), images, "conv1", path, layout="tokens", overwrite=True, **kw)
    with pytest.raises(KeyError, match="no layer 'conv9'"):
        cap(SmallCNN(seed=1), images, "conv9", path, overwrite=True, **kw)
    monkeypatch.setattr(Failing, "budget", 0)  # fails in its first batch
    with pytest.raises(KeyboardInterrupt):
        cap(Failing(seed=1), images, "conv1", path, overwrite=True, **kw)
    assert files(path) == before and capture_id(path) == first_id
    np.testing.assert_array_equal(old["conv2"].read(), ActivationStore(path)["conv2"].read())
    # once its first batch ran, the new capture is the store at the path, and resumes
    monkeypatch.setattr(Failing, "budget", 3)  # 24 samples: chunk 0 is written
    with pytest.raises(KeyboardInterrupt):
        cap(Failing(seed=1), images, "conv1", path, overwrite=True, **kw)
    assert progress_of(path)["chunks_written"] == 1 and capture_id(path) != first_id
    with pytest.raises(StoreError, match="replaced or changed"):
        old["conv1"].read()
    monkeypatch.setattr(Failing, "budget", -1)
    resumed = cap(Failing(seed=1), images, "conv1", path, **kw)
    fresh = cap(Failing(seed=1), images, "conv1", tmp_path / "fresh.zarr", **kw)
    assert files(resumed.path) == files(fresh.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.zarr", "s.zarr"]  # no leftovers


def test_an_empty_folder_is_no_store(images, tmp_path):
    model = SmallCNN()
    ref = reference_cnn(model, images, 16)["conv1"]
    for overwrite in (False, True):
        path = tmp_path / f"made-ahead-{overwrite}"
        path.mkdir()
        with pytest.raises(FileNotFoundError, match="no activation store.*empty folder"):
            ActivationStore(path)
        store = cap(
            model, images, "conv1", path, dtype="float32", batch_size=16, overwrite=overwrite
        )
        np.testing.assert_allclose(store["conv1"].read(), ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- read errors


class ShortReads:
    """A file whose ``readinto`` gives at most ``limit`` bytes per call, as a kernel may."""

    def __init__(self, fh, limit: int, calls: list) -> None:
        self.fh, self.limit, self.calls = fh, limit, calls

    def readinto(self, buf) -> int:
        self.calls.append(1)
        return self.fh.readinto(memoryview(buf)[: self.limit])

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def test_buffered_reads_read_on_until_the_chunk_file_ends(small_store, monkeypatch):
    """One ``readinto`` may give fewer bytes than asked (Linux: under 2 GiB per call)."""
    zarr = pytest.importorskip("zarr")
    from peekcore.store import chunkfile as store_mod

    want = zarr.open_array(small_store.path / "layers" / "conv1" / "activations", mode="r")[:]
    calls: list = []
    monkeypatch.setattr(
        store_mod, "open", lambda *a, **k: ShortReads(open(*a, **k), 1000, calls), raising=False
    )
    monkeypatch.setattr(store_mod, "_MAP_READS", False)
    layer = ActivationStore(small_store.path, read_mode="buffered")["conv1"]
    np.testing.assert_array_equal(layer.read(0, 48), want[:48])
    assert len(calls) > 3 * 16 * 6 * 64 * 4 // 1000  # three whole chunk files, in short reads
    np.testing.assert_array_equal(np.concatenate(list(layer.chunks())), want)
    path = chunk_file(small_store.path, "conv1", 1, 4)
    good = path.read_bytes()
    for bad in (good[:-7], good + b"\0" * 3000):  # and they still see a short or long file
        path.write_bytes(bad)
        with pytest.raises(StoreError, match=r"samples 16\.\.31 of layer 'conv1'.*does not hold"):
            layer.read(16, 32)


def test_read_failures_that_are_not_the_files_pass_unchanged(small_store, monkeypatch):
    import errno

    from peekcore.store import chunkfile as store_mod

    layer = ActivationStore(small_store.path, read_mode="buffered")["conv1"]
    want = layer.read(0, 16)

    def failing(err):
        def read(*args, **kwargs):
            raise err

        return read

    for err in (MemoryError("Unable to allocate 24.0 KiB"), RuntimeError("not the file")):
        monkeypatch.setattr(store_mod, "_read_chunk_file", failing(err))
        with pytest.raises(type(err)) as caught:
            layer.read(0, 16)
        assert caught.value is err  # as it was raised, not called a corrupt file
    monkeypatch.setattr(store_mod, "_read_chunk_file", failing(OSError(errno.EIO, "I/O error")))
    with pytest.raises(StoreError, match=r"samples 0\.\.15 .*OSError.*disk or file system"):
        layer.read(0, 16)
    monkeypatch.undo()
    np.testing.assert_array_equal(layer.read(0, 16), want)


def test_kept_mapped_chunks_hold_few_file_descriptors(tmp_path, monkeypatch):
    """Python's mmap keeps a descriptor per mapping: a caller keeping every chunk gets
    new arrays past MAX_LIVE_MAPPINGS, so descriptors stay bounded."""
    from peekcore.store import chunkfile as store_mod

    if not store_mod._MAP_READS or not Path("/proc/self/fd").exists():
        pytest.skip("mapped reads and /proc/self/fd are Linux's")
    x = np.random.default_rng(0).standard_normal((40, 3, 4, 4)).astype(np.float32)
    store = cap(
        nn.Sequential(nn.Identity()), x, "0", tmp_path / "s.zarr", chunk_size=4, dtype="float32"
    )
    counts = buffered_reads(monkeypatch, "mapped")
    monkeypatch.setattr(store_mod, "MAX_LIVE_MAPPINGS", 3)
    layer = ActivationStore(store.path, read_mode="buffered")["0"]
    layer.read(36, 40)  # zarr's own reader (its event loop's descriptors) started
    before = len(os.listdir("/proc/self/fd"))
    kept = list(layer.chunks())
    assert len(os.listdir("/proc/self/fd")) - before <= 3
    assert counts["map"] == 3  # the first three mapped, the other seven read
    np.testing.assert_array_equal(np.concatenate(kept), x)
    del kept
    gc.collect()
    assert store_mod._live_mappings[0] == 0  # every mapping released with its array
