"""Follow-ups of the fault review (#16): input dtypes, the report's images, concurrent writers.

Each test here failed before its fix: integer ``.npy`` inputs into a float
model gave torch's raw dtype error; the report memory-mapped its images (a
file that shrank meanwhile killed it with SIGBUS); two processes could write
one store or checkpoint at once.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from peekcli import run_peek
from torch import nn

import peekcore
from peekcore.errors import InvalidTypeError

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
