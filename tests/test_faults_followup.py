"""Follow-ups of the fault review (#16): input dtypes, the report's images, concurrent writers.

Each test here failed before its fix: integer ``.npy`` inputs into a float
model gave torch's raw dtype error; the report memory-mapped its images (a
file that shrank meanwhile killed it with SIGBUS); two processes could write
one store or checkpoint at once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from peekcli import run_peek
from torch import nn

import peekcore
from peekcore import CPModel
from peekcore.errors import ConcurrentWriteError, DataError, InvalidTypeError, StoreError
from peekcore.npyfile import NpyArray
from peekcore.report import build_report

# ---------------------------------------------------------------- 1. input dtypes


def _conv_net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3)).to(dtype).eval()


def _images(dtype: object, n: int = 10) -> np.ndarray:
    x = np.random.default_rng(5).random((n, 1, 8, 8))
    if np.dtype(dtype) == np.bool_:
        return x > 0.5
    if np.dtype(dtype).kind in "iu":
        return (x * 255).astype(dtype)
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.bool_])
def test_integer_inputs_into_a_float_model_are_refused_before_a_store_exists(tmp_path, dtype):
    np.save(tmp_path / "x.npy", _images(dtype))
    store = tmp_path / "s.zarr"
    with pytest.raises(InvalidTypeError) as info:
        peekcore.capture(_conv_net(), tmp_path / "x.npy", ["0"], store, dtype="float32")
    msg = str(info.value)
    name = np.dtype(dtype).name
    assert f"inputs are {name}" in msg and "model computes in float32" in msg
    assert "x.astype('float32')" in msg and "transform=lambda t: t.float()" in msg
    assert ("/ 255" in msg) == (name == "uint8")  # the 8-bit image scale, said only there
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's error, kept as the cause
    assert not store.exists()
    with pytest.raises(InvalidTypeError, match=f"inputs are {name}"):
        peekcore.ModelSource(_conv_net(), _images(dtype), "0")


def test_integer_inputs_a_model_takes_are_passed_as_they_are(tmp_path):
    # token ids into an embedding: the model's first parameter is a float, its input is not
    torch.manual_seed(1)
    embed = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 5)).eval()
    ids = np.random.default_rng(2).integers(0, 20, (12, 7))
    store = peekcore.capture(embed, ids, ["1"], tmp_path / "e.zarr", dtype="float32")
    want = embed.double()(torch.as_tensor(ids)).detach().numpy()  # float64 reference
    got = np.asarray(store["1"].read())  # tokens layout: N x C x T
    np.testing.assert_allclose(got, want.transpose(0, 2, 1), rtol=1e-5, atol=1e-6)

    # a forward that scales 8-bit images itself takes them as stored
    class Scaling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = _conv_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.float() / 255)

    model, images = Scaling().eval(), _images(np.uint8)
    store = peekcore.capture(model, images, ["conv.0"], tmp_path / "u.zarr", dtype="float32")
    ref = _conv_net(torch.float64)[0](torch.as_tensor(images / 255.0)).detach().numpy()
    np.testing.assert_allclose(np.asarray(store["conv.0"].read()), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float_inputs_are_converted_to_the_model_dtype(tmp_path, dtype):
    x = _images(dtype)
    np.save(tmp_path / "x.npy", x)
    got = peekcore.capture(
        _conv_net(), tmp_path / "x.npy", ["2"], tmp_path / "s.zarr", dtype="float32"
    )
    got = np.asarray(got["2"].read())
    # the same as the inputs converted by the caller, bit for bit ...
    x32 = x.astype(np.float32)
    same = peekcore.capture(_conv_net(), x32, ["2"], tmp_path / "r.zarr", dtype="float32")
    np.testing.assert_array_equal(got, np.asarray(same["2"].read()))
    # ... and a float64 model on those inputs to float32 rounding
    ref = _conv_net(torch.float64)(torch.as_tensor(x32.astype(np.float64))).detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # into a float64 model, float16 and float32 inputs convert exactly
    source = peekcore.ModelSource(_conv_net(torch.float64), x, "2")
    chunk = next(source.chunks(len(x))).double().numpy()
    np.testing.assert_allclose(
        chunk,
        _conv_net(torch.float64)(torch.as_tensor(x.astype(np.float64))).detach().numpy(),
        rtol=1e-6,
        atol=1e-7,
    )


NET = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    """
)


@pytest.mark.slow
def test_peek_capture_of_8_bit_images_says_how_to_convert(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    np.save(tmp_path / "images.npy", _images(np.uint8))
    argv = ["capture", "--model", "net.py:make", "--data", "images.npy", "--layers", "0"]
    out = run_peek(*argv, "--store", "s.zarr", cwd=tmp_path)
    assert out.returncode != 0
    assert "inputs are uint8" in out.stderr and "x.astype('float32') / 255" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "s.zarr").exists()


# ---------------------------------------------------------------- 2. the report's images


def _report_inputs(folder: Path) -> tuple[Path, np.ndarray]:
    """A saved 3-way model (20 samples, 3 x 3 space) and its 20 images in ``images.npy``."""
    rng = np.random.default_rng(7)
    model = CPModel(rng.random(2) + 0.5, [rng.random((n, 2)) for n in (20, 4, 9)])
    model.save(folder / "model.npz")
    images = rng.integers(0, 256, (20, 1, 24, 24), dtype=np.uint8)  # 3 pages
    np.save(folder / "images.npy", images)
    return folder / "model.npz", images


def test_truncated_image_and_label_files_are_data_errors(tmp_path):
    model, _ = _report_inputs(tmp_path)
    path = tmp_path / "images.npy"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 200)
    with pytest.raises(DataError, match="images.npy is truncated"):
        build_report([model], tmp_path / "r.html", images=path, components=1)
    np.save(tmp_path / "labels.npy", np.arange(20) % 3)
    with open(tmp_path / "labels.npy", "r+b") as fh:
        fh.truncate(150)
    with pytest.raises(DataError, match="labels.npy is truncated"):
        build_report([model], tmp_path / "r.html", labels=tmp_path / "labels.npy")


SHRINK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import peekcore.report.assemble as assemble
    from peekcore.errors import DataError

    real = assemble.component_figure
    def shrinking(model, images, r, **kwargs):  # the file is cut short once figures begin
        with open("images.npy", "r+b") as fh:
            fh.truncate(200)
        return real(model, images, r, **kwargs)

    assemble.component_figure = shrinking
    try:
        assemble.build_report(["model.npz"], "r.html", images="images.npy", components=1)
    except DataError as err:
        print("DataError:", err)
        sys.exit(3)
    """
)


@pytest.mark.slow
def test_an_image_file_that_shrinks_while_the_report_is_built_is_a_data_error(tmp_path):
    # in a process of its own: a memory-mapped file that shrinks kills with SIGBUS
    _report_inputs(tmp_path)
    (tmp_path / "shrink.py").write_text(SHRINK)
    out = subprocess.run(
        [sys.executable, "shrink.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 3, (out.returncode, out.stderr[-2000:])
    assert "DataError: " in out.stdout and "images.npy shrank while it was read" in out.stdout
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_an_image_file_replaced_while_the_report_is_built_is_read_as_it_was(tmp_path, monkeypatch):
    import peekcore.report.assemble as assemble

    model, images = _report_inputs(tmp_path)
    seen = []

    def replacing(model, images_given, r, **kwargs):
        if r == 0:  # another array renamed over the file once the figures begin
            np.save(tmp_path / "other.npy", 255 - images)
            os.replace(tmp_path / "other.npy", tmp_path / "images.npy")
        seen.append(np.stack([images_given[i] for i in range(len(images))]))
        return real(model, images_given, r, **kwargs)

    real = assemble.component_figure
    monkeypatch.setattr(assemble, "component_figure", replacing)
    np.save(tmp_path / "labels.npy", np.arange(20) % 3)  # read whole, as before
    built = build_report(
        [model], tmp_path / "r.html", images=tmp_path / "images.npy", labels=tmp_path / "labels.npy"
    )
    assert built.path.exists() and len(seen) == 2
    assert [p.name for p in built.figures_dir.glob("*classes.png")] == ["model_classes.png"]
    for got in seen:  # every figure of the report drew the images it began with
        np.testing.assert_array_equal(got, images)


def test_an_npy_array_held_open_refuses_a_file_replaced_before_it_was_held(tmp_path):
    path = tmp_path / "x.npy"
    x = np.random.default_rng(3).random((6, 5))
    np.save(path, x)
    arr = NpyArray(path)
    with arr:  # held: reads one descriptor, nested entries share it
        with arr:
            np.testing.assert_array_equal(arr[2:5], x[2:5])
        os.replace(_saved(tmp_path / "y.npy", x[:3]), path)
        np.testing.assert_array_equal(arr[5], x[5])
    np.save(path, x.astype(np.float32))  # another dtype now: the header differs
    with pytest.raises(DataError, match="replaced by another array"):
        arr.__enter__()


def _saved(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


# ---------------------------------------------------------------- 3. one writer at a time

LOCKED_NET = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path

    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    import peekcore


    class Net(nn.Sequential):
        # HOLD_AT=i: the forward of the batch with sample i writes the file "ready", then
        # waits for the file "go"; FAIL_AT=i: it fails (the capture stops with a partial
        # store). In the forward, not the data set: capture reads the data set once more,
        # for its fingerprint, before the capture passes
        def forward(self, x):
            ids = {int(v) for v in x[:, 0, 0, 0].tolist()}  # each image's pixel 0 is its index
            if os.environ.get("HOLD_AT") and int(os.environ["HOLD_AT"]) in ids:
                Path("ready").write_text(str(os.getpid()))
                while not Path("go").exists():
                    time.sleep(0.01)
            if os.environ.get("FAIL_AT") and int(os.environ["FAIL_AT"]) in ids:
                raise RuntimeError("stopped on purpose")
            return super().forward(x)


    def make():
        torch.manual_seed(0)
        return Net(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()


    class Images(Dataset):
        def __init__(self):
            x = np.random.default_rng(0).random((64, 1, 8, 8))
            x[:, 0, 0, 0] = np.arange(64)
            self.x = torch.as_tensor(x, dtype=torch.float32)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]


    def capture(store):
        return peekcore.capture(
            make(), Images(), ["0"], store, batch_size=8, chunk_size=8, dtype="float32"
        )
    """
)


@contextlib.contextmanager
def _started(argv: list[str], env: dict) -> Iterator[subprocess.Popen]:
    """A process running ``argv``; killed if it still runs when the block ends."""
    with subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def _wait_for(ready: Path, proc: subprocess.Popen) -> None:
    """Until the other process writes ``ready`` (a handshake: no guessed delay)."""
    deadline = time.monotonic() + 240
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the other process never got ready"
        time.sleep(0.01)


@pytest.mark.slow
def test_two_processes_resuming_one_store_are_locked_out_until_the_first_dies(
    tmp_path, monkeypatch
):
    (tmp_path / "lockednet.py").write_text(LOCKED_NET)
    monkeypatch.chdir(tmp_path)
    # the module as the other process imports it (the data's fingerprint names it), but
    # not left in sys.modules
    spec = importlib.util.spec_from_file_location("lockednet", tmp_path / "lockednet.py")
    net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(net)
    monkeypatch.setenv("FAIL_AT", "20")
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        net.capture("s.zarr")  # a partial store: 2 of 8 chunks
    monkeypatch.delenv("FAIL_AT")
    env = {**os.environ, "HOLD_AT": "40"}
    argv = [sys.executable, "-c", "import lockednet; lockednet.capture('s.zarr')"]
    with _started(argv, env) as proc:
        _wait_for(tmp_path / "ready", proc)  # it resumed the store and holds mid-capture
        with pytest.raises(ConcurrentWriteError) as info:
            net.capture("s.zarr")
        assert info.value.pid == proc.pid
        assert f"process {proc.pid} is writing the store s.zarr" in str(info.value)
        assert "Wait until it has finished" in str(info.value)
        with pytest.raises(StoreError, match="incomplete"):  # readers take no lock
            peekcore.ActivationStore("s.zarr")
        proc.send_signal(signal.SIGKILL)  # the kernel lets go of a dead process's lock
        assert proc.wait(timeout=240) == -signal.SIGKILL
    assert (tmp_path / ".s.zarr.lock").exists()  # left by the killed holder: harmless
    got = np.asarray(net.capture("s.zarr")["0"].read())  # resumed to the end
    want = np.asarray(net.capture("ref.zarr")["0"].read())
    np.testing.assert_array_equal(got, want)
    assert not (tmp_path / ".s.zarr.lock").exists()  # its last holder removed it


HELD_FIT = textwrap.dedent(
    """
    import time
    from pathlib import Path

    import numpy as np

    import peekcore


    def hold(info):  # after iteration 3 (its checkpoint written): "ready", then wait for "go"
        if info.iteration == 3:
            Path("ready").touch()
            while not Path("go").exists():
                time.sleep(0.01)


    peekcore.cp_als(np.load("x.npy"), 3, n_iter_max=6, tol=0, random_state=1,
                    checkpoint="ck.npz", callback=hold)
    """
)


@pytest.mark.slow
def test_two_fits_writing_one_checkpoint_are_locked_out_of_each_other(tmp_path, monkeypatch):
    x = np.random.default_rng(9).random((60, 5, 4))
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "fit.py").write_text(HELD_FIT)
    monkeypatch.chdir(tmp_path)
    kw = {"n_iter_max": 6, "tol": 0, "random_state": 1}
    with _started([sys.executable, "fit.py"], dict(os.environ)) as proc:
        _wait_for(tmp_path / "ready", proc)
        with pytest.raises(ConcurrentWriteError) as info:
            peekcore.cp_als(x, 3, checkpoint="ck.npz", resume="ck.npz", **kw)
        assert info.value.pid == proc.pid and "the checkpoint ck.npz" in str(info.value)
        # a fit that only reads the checkpoint takes no lock
        peekcore.cp_als(x, 3, resume="ck.npz", **kw)
        (tmp_path / "go").touch()
        assert proc.wait(timeout=240) == 0, proc.stderr.read()[-3000:]
    assert not (tmp_path / ".ck.npz.lock").exists()
    resumed = peekcore.cp_als(x, 3, checkpoint="ck.npz", resume="ck.npz", **kw)
    whole = peekcore.cp_als(x, 3, **kw)
    np.testing.assert_array_equal(resumed.weights, whole.weights)
    for a, b in zip(resumed.factors, whole.factors, strict=True):
        np.testing.assert_array_equal(a, b)


def test_component_edits_of_8_bit_images_say_how_to_convert():
    from peekcore.edits import edited_outputs

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    rng = np.random.default_rng(4)
    cp = CPModel(np.ones(2), [rng.random((10, 2)), rng.random((4, 2))] + [rng.random((6, 2))] * 2)
    images = _images(np.uint8)
    with pytest.raises(InvalidTypeError, match=r"inputs are uint8.*astype\('float32'\) / 255"):
        edited_outputs(net, "0", cp, images, remove=[0])
    # converted as the error says, they run: no edit gives the model's own outputs
    x = images.astype(np.float32) / 255
    out = edited_outputs(net, "0", cp, x, remove=[])
    want = net.double()(torch.as_tensor(x, dtype=torch.float64)).detach().numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
