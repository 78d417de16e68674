"""Hooks by layer name, layouts, selectors, data inputs, and the live ModelSource."""

from __future__ import annotations

import dataclasses
import re
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import peekcore
from peekcore.capture import ModelSource, capture, resolve_layers, weights_hash
from peekcore.datasets import ArrayDataset, digits, image_folder

# ---------------------------------------------------------------- models built here


class SmallCNN(nn.Module):
    """conv -> relu (in place) -> conv -> pool -> linear, for 1 x 8 x 8 inputs."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 10, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(40, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class Block(nn.Module):
    """A pre-norm transformer block on N x T x D tokens."""

    def __init__(self, d: int = 8, heads: int = 2, ff: int = 12, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a, _ = self.attn(h, h, h, need_weights=False)
        if not self.batch_first:
            a = a.transpose(0, 1)
        x = x + a
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 8, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.Sequential(Block(d, batch_first=batch_first), Block(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


def cap(model, data, layers, path, **kw):
    return capture(model, data, layers, path, **kw)


@pytest.fixture
def images(rng):
    return rng.standard_normal((53, 1, 8, 8)).astype(np.float32)


@pytest.fixture
def tokens(rng):
    return rng.standard_normal((21, 5, 8)).astype(np.float32)


# ---------------------------------------------------------------- layer names


def test_missing_layer_lists_close_matches():
    with pytest.raises(KeyError, match=r"no layer 'conv3'.*Closest names: conv2, conv1"):
        resolve_layers(SmallCNN(), ["conv3"])


def test_layer_names_checked():
    model = SmallCNN()
    with pytest.raises(ValueError, match="at least one layer"):
        resolve_layers(model, [])
    with pytest.raises(ValueError, match="twice"):
        resolve_layers(model, ["conv1", "conv1"])
    with pytest.raises(ValueError, match="non-empty"):
        resolve_layers(model, [""])
    assert list(resolve_layers(model, "conv2")) == ["conv2"]
    assert list(resolve_layers(TinyTransformer(), ["blocks.1.mlp.0"])) == ["blocks.1.mlp.0"]


# ---------------------------------------------------------------- CNN layouts


def reference_cnn(model: SmallCNN, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Run the CNN by hand, layer by layer, batch by batch."""
    out: dict[str, list] = {"conv1": [], "relu1": [], "conv2": [], "pool": []}
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            xb = torch.from_numpy(x[lo : lo + batch])
            c1 = model.conv1(xb)
            r1 = torch.relu(c1)
            c2 = model.conv2(r1)
            out["conv1"].append(c1.numpy())
            out["relu1"].append(r1.numpy())
            out["conv2"].append(c2.numpy())
            out["pool"].append(model.pool(torch.relu(c2)).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def test_multi_layer_capture_equals_layer_by_layer(images, tmp_path):
    model = SmallCNN()
    layers = ["conv1", "relu1", "conv2", "pool"]
    store = cap(model, images, layers, tmp_path / "s.zarr", dtype="float32", batch_size=16)
    ref = reference_cnn(model, images, 16)
    for name in layers:
        np.testing.assert_allclose(store[name][:], ref[name], rtol=1e-6, atol=1e-6)
        assert store[name].dims == ("sample", "channel", "y", "x")
    # conv1 is hooked before the in-place ReLU changes it: negatives survive
    assert store["conv1"][:].min() < 0
    assert store.labels is None
    np.testing.assert_array_equal(store.sample_ids, np.arange(len(images)))


def test_fold_spatial(images, tmp_path):
    model = SmallCNN()
    store = cap(model, images, "conv2", tmp_path / "s.zarr", dtype="float32", fold_spatial=True)
    layer = store["conv2"]
    assert layer.shape == (53, 10, 64)
    assert layer.dims == ("sample", "channel", "space")
    ref = reference_cnn(model, images, 64)["conv2"].reshape(53, 10, 64)
    np.testing.assert_allclose(layer[:], ref, rtol=1e-6, atol=1e-6)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv1d(3, 4, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


def test_conv1d_kept_channels_first_and_explicit_layouts(rng, tmp_path):
    x = rng.standard_normal((9, 3, 7)).astype(np.float32)
    model = Conv1dNet()
    store = cap(
        model,
        x,
        ["conv", "act"],
        tmp_path / "s.zarr",
        dtype="float32",
        layout={"act": "channels_first"},
    )
    with torch.no_grad():
        ref = model.conv(torch.from_numpy(x)).numpy()
    assert store["conv"].dims == ("sample", "channel", "x")
    np.testing.assert_allclose(store["conv"][:], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(store["act"][:], np.maximum(ref, 0), rtol=1e-6, atol=1e-6)
    assert store["act"].attrs["layout"] == "channels_first"
    # without the override, a 3-way output of a ReLU is read as tokens N x T x D -> N x D x T
    auto = cap(model, x, "act", tmp_path / "t.zarr", dtype="float32")
    assert auto["act"].dims == ("sample", "channel", "token")
    np.testing.assert_allclose(auto["act"][:], np.maximum(ref, 0).transpose(0, 2, 1), atol=1e-6)


class ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Identity()

    def forward(self, x):
        return self.body(x.permute(0, 2, 3, 1))


def test_channels_last(images, tmp_path):
    x = np.repeat(images[:, :, :, :6], 2, axis=1)  # N x 2 x 8 x 6
    store = cap(
        ChannelsLast(), x, "body", tmp_path / "s.zarr", dtype="float32", layout="channels_last"
    )
    np.testing.assert_array_equal(store["body"][:], x)


def test_eval_mode_inference_and_training_flags_restored(images, tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Dropout(0.5), nn.Conv2d(3, 2, 1))
    model.train()
    store = cap(model, images, "1", tmp_path / "s.zarr", dtype="float32")
    with torch.no_grad():
        ref = model[0](torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(store["1"][:], ref, rtol=1e-6, atol=1e-6)  # dropout off
    assert all(m.training for m in model.modules())

    seen = []

    def probe(module, args, out):
        seen.append((torch.is_inference_mode_enabled(), module.training))

    handle = model[2].register_forward_hook(probe)
    try:
        cap(model, images, "0", tmp_path / "t.zarr", batch_size=8)
        # the first of 7 batches runs whole, the others stop after the last hooked layer
        assert seen == [(True, False)]
        cap(model, images, "2", tmp_path / "u.zarr", batch_size=8)
        assert len(seen) == 8
    finally:
        handle.remove()


# ---------------------------------------------------------------- token outputs


def test_transformer_tokens_kept_as_n_d_t(tokens, tmp_path):
    model = TinyTransformer()
    layers = ["blocks.0.mlp.0", "blocks.0.norm2", "blocks.0", "blocks.1.attn"]
    store = cap(
        model,
        tokens,
        layers,
        tmp_path / "s.zarr",
        dtype="float32",
        batch_size=8,
        select={"blocks.1.attn": 0},
    )
    x = torch.from_numpy(tokens)
    blk = model.blocks[0]
    with torch.no_grad():
        h = blk.norm1(x)
        a, _ = blk.attn(h, h, h, need_weights=False)
        y = x + a
        n2 = blk.norm2(y)
        m0 = blk.mlp[0](n2)
        out0 = y + blk.mlp(n2)
        h1 = model.blocks[1].norm1(out0)
        a1, _ = model.blocks[1].attn(h1, h1, h1, need_weights=False)
    expect = {
        "blocks.0.mlp.0": m0,
        "blocks.0.norm2": n2,
        "blocks.0": out0,
        "blocks.1.attn": a1,
    }
    for name, ref in expect.items():
        layer = store[name]
        assert layer.dims == ("sample", "channel", "token")
        assert layer.shape == (21, ref.shape[2], 5)
        np.testing.assert_allclose(layer[:], ref.permute(0, 2, 1).numpy(), rtol=1e-5, atol=1e-5)
    assert store["blocks.1.attn"].attrs["select"] == 0


def test_tuple_output_needs_a_selector(tokens, tmp_path):
    with pytest.raises(
        TypeError, match=r"returns a tuple \(Tensor\(8, 5, 8\), NoneType\).*select="
    ):
        cap(TinyTransformer(), tokens, "blocks.0.attn", tmp_path / "s.zarr", batch_size=8)
    with pytest.raises(ValueError, match="out of range"):
        cap(TinyTransformer(), tokens, "blocks.0.attn", tmp_path / "t.zarr", select=5)


def test_sequence_first(tokens, tmp_path):
    model = TinyTransformer(batch_first=False)
    store = cap(
        model,
        tokens,
        "blocks.0.attn",
        tmp_path / "s.zarr",
        dtype="float32",
        select=0,
        layout="sequence_first",
        batch_size=7,
    )
    blk = model.blocks[0]
    with torch.no_grad():
        h = blk.norm1(torch.from_numpy(tokens)).transpose(0, 1)
        a, _ = blk.attn(h, h, h, need_weights=False)  # T x N x D
    np.testing.assert_allclose(store["blocks.0.attn"][:], a.permute(1, 2, 0).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="sequence_first"):
        cap(model, tokens, "blocks.0.attn", tmp_path / "t.zarr", select=0, batch_size=7)


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        y = self.inner(x)
        return {"features": y, "pooled": y.mean((2, 3))}


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.head = DictOut()
        self.obj = nn.Identity()

    def forward(self, x):
        out = self.head(x)
        self.obj(out["features"])
        return out


def test_dict_and_callable_selectors(images, tmp_path):
    model = Holder()
    store = cap(model, images, ["head"], tmp_path / "s.zarr", dtype="float32", select="features")
    with torch.no_grad():
        ref = model.head.inner(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(store["head"][:], ref, atol=1e-6)
    s2 = cap(
        model,
        images,
        ["head"],
        tmp_path / "t.zarr",
        dtype="float32",
        select=lambda out: out["features"] * 2,
    )
    np.testing.assert_allclose(s2["head"][:], 2 * ref, atol=1e-6)
    with pytest.raises(TypeError, match=r"returns a dict \{'features': Tensor.*select="):
        cap(model, images, ["head"], tmp_path / "u.zarr")
    with pytest.raises(ValueError, match="not one of them"):
        cap(model, images, ["head"], tmp_path / "v.zarr", select="nope")


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Conv2d(1, 2, 1)
        self.spare = nn.Conv2d(1, 2, 1)
        self.shared = nn.Identity()

    def forward(self, x):
        return self.shared(self.shared(self.used(x)))


def test_layers_that_do_not_run_once(images, tmp_path):
    with pytest.raises(RuntimeError, match=r"\['spare'\] produced no output"):
        cap(Unused(), images, ["used", "spare"], tmp_path / "s.zarr")
    with pytest.raises(RuntimeError, match="ran twice"):
        cap(Unused(), images, ["shared", "used"], tmp_path / "t.zarr")


def test_autocast_and_half_storage(images, tmp_path):
    model = SmallCNN()
    ref = reference_cnn(model, images, 64)["conv2"]
    store = cap(model, images, "conv2", tmp_path / "s.zarr", autocast=True, dtype="bfloat16")
    got = store["conv2"].read()
    assert got.dtype == torch.bfloat16
    np.testing.assert_allclose(got.float().numpy(), ref, rtol=0.05, atol=0.1)


def test_float16_overflow_is_refused(images, tmp_path):
    model = nn.Sequential(nn.Identity())
    with pytest.raises(ValueError, match="float16 overflows above 65504"):
        cap(model, images * 1e6, "0", tmp_path / "s.zarr")


def test_progress_bar_shows_images_per_second(images, tmp_path, capsys):
    cap(SmallCNN(), images, "conv1", tmp_path / "s.zarr", progress=True)
    err = capsys.readouterr().err
    assert "capture" in err and "img/s" in err


def test_weights_hash_sees_every_weight():
    a, b = SmallCNN(0), SmallCNN(0)
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        b.fc.bias[3] += 1e-7
    assert weights_hash(a) != weights_hash(b)


# ---------------------------------------------------------------- data inputs


class PairDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y
        self.transform = None

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def test_every_input_kind_gives_the_same_store(images, tmp_path, rng):
    labels = rng.integers(0, 5, len(images))
    model = SmallCNN()
    ref = cap(model, (images, labels), "conv2", tmp_path / "ref.zarr", dtype="float32")
    np.testing.assert_array_equal(ref.labels, labels)
    assert ref.labels.dtype == np.int64
    ds = PairDataset(images, labels)
    np.save(tmp_path / "x.npy", images)
    kinds = {
        "tensor": (torch.from_numpy(images), None),
        "npy": (tmp_path / "x.npy", None),
        "dataset": (ds, labels),
        "loader": (DataLoader(ds, batch_size=10), labels),
        "tensor_dataset": (
            TensorDataset(torch.from_numpy(images), torch.from_numpy(labels)),
            labels,
        ),
    }
    for kind, (data, want_labels) in kinds.items():
        store = cap(model, data, "conv2", tmp_path / f"{kind}.zarr", dtype="float32", batch_size=12)
        np.testing.assert_allclose(store["conv2"][:], ref["conv2"][:], atol=1e-6, err_msg=kind)
        # one identity for the model inputs, labels or not (component importance reads it)
        want = ref.attrs["settings"]["inputs_fingerprint"]
        assert store.attrs["settings"]["inputs_fingerprint"] == want, kind
        if want_labels is None:
            assert store.labels is None
        else:
            np.testing.assert_array_equal(store.labels, want_labels)


def test_loader_that_shuffles_is_refused(images, tmp_path):
    loader = DataLoader(TensorDataset(torch.from_numpy(images)), batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        cap(SmallCNN(), loader, "conv1", tmp_path / "s.zarr")


def test_n_samples_and_transform(images, tmp_path):
    store = cap(
        SmallCNN(),
        images,
        "conv1",
        tmp_path / "s.zarr",
        dtype="float32",
        n_samples=20,
        transform=lambda t: t * 0,
    )
    assert store["conv1"].shape[0] == 20
    bias = SmallCNN().conv1.bias.detach().numpy()
    np.testing.assert_allclose(
        store["conv1"][:], np.broadcast_to(bias[None, :, None, None], (20, 6, 8, 8)), atol=1e-6
    )
    with pytest.raises(ValueError, match="only 53 samples"):
        cap(SmallCNN(), images, "conv1", tmp_path / "t.zarr", n_samples=54)
    with pytest.raises(ValueError, match="put the transform in"):
        cap(
            SmallCNN(),
            PairDataset(images, images[:, 0, 0, 0]),
            "conv1",
            tmp_path / "u.zarr",
            transform=lambda t: t,
        )


def test_bad_inputs_say_what_to_pass(tmp_path):
    with pytest.raises(TypeError, match="cannot read inputs of type dict"):
        cap(SmallCNN(), {"x": 1}, "conv1", tmp_path / "s.zarr")
    with pytest.raises(TypeError, match="labels must be numeric"):
        ArrayDataset(np.zeros((2, 1)), np.array(["a", "b"]))
    with pytest.raises(ValueError, match="one label per input row"):
        ArrayDataset(np.zeros((2, 1)), np.zeros(3))
    with pytest.raises(ValueError, match="stored as float16, bfloat16 or float32"):
        cap(
            SmallCNN(),
            np.zeros((2, 1, 8, 8), np.float32),
            "conv1",
            tmp_path / "t.zarr",
            dtype="int8",
        )


def test_digits():
    ds = digits()
    assert len(ds) == 1797
    x, y = ds.batch(0, 10)
    assert x.shape == (10, 1, 8, 8) and x.dtype == torch.float32
    assert float(ds.inputs.min()) == 0.0 and float(ds.inputs.max()) == 1.0
    np.testing.assert_array_equal(y, np.arange(10))
    assert peekcore.datasets.digits is digits


def test_digits_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        digits()


def test_image_folder_without_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    with pytest.raises(ImportError, match="needs torchvision"):
        cap(SmallCNN(), str(tmp_path / "imgs"), "conv1", tmp_path / "s.zarr")
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        image_folder(tmp_path / "nope")


def test_image_folder_through_torchvision_api(tmp_path, monkeypatch, images):
    """With torchvision present, a folder goes through its ImageFolder (faked here)."""
    made = {}

    class FakeImageFolder(Dataset):
        def __init__(self, root, transform=None):
            made["root"], made["transform"] = root, transform
            self.root = root
            self.transform = transform
            self.samples = [(f"{root}/c{i % 2}/{i}.png", i % 2) for i in range(len(images))]

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
            return self.transform(images[i]), self.samples[i][1]

    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(ImageFolder=FakeImageFolder)
    tv.transforms = types.SimpleNamespace(ToTensor=lambda: torch.from_numpy)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    folder = tmp_path / "imgs"
    folder.mkdir()
    store = cap(SmallCNN(), folder, "conv1", tmp_path / "s.zarr", dtype="float32")
    assert made["root"] == str(folder)
    assert store.labels.tolist() == [i % 2 for i in range(len(images))]
    assert "FakeImageFolder" in store.provenance["data_source"]


# ---------------------------------------------------------------- ModelSource


def test_model_source_is_a_chunk_source(images, tmp_path):
    model = SmallCNN()
    src = ModelSource(model, images, "conv2", batch_size=16)
    assert isinstance(src, peekcore.ChunkSource)
    assert src.shape == (53, 10, 8, 8) and src.dtype == "float32"
    assert src.dims == ("sample", "channel", "y", "x")
    ref = reference_cnn(model, images, 16)["conv2"]
    for size in (7, 16, 100):
        parts = list(src.chunks(size))
        assert [p.shape[0] for p in parts[:-1]] == [size] * (len(parts) - 1)
        np.testing.assert_allclose(torch.cat(parts).numpy(), ref, rtol=1e-6, atol=1e-6)
    assert src.passes == 3


def test_fit_on_model_source_equals_fit_on_array(images):
    model = SmallCNN()
    src = ModelSource(model, images, "conv2", batch_size=16)
    arr = torch.cat(list(src.chunks(64))).numpy()
    kw = dict(n_iter_max=4, tol=0.0, random_state=3, chunk_size=10)
    live = peekcore.cp_als(src, 3, **kw)
    ref = peekcore.cp_als(arr, 3, **kw)
    np.testing.assert_allclose(live.weights, ref.weights, rtol=1e-12)
    assert src.passes >= 5


class Drifting(nn.Module):
    """Different output on every call: a stand-in for a non-deterministic model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) + self.calls


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return self.conv(x) + torch.randn_like(x)


def test_model_source_refuses_non_deterministic_models(images):
    src = ModelSource(Wrap(Drifting()), images, "m", batch_size=8)
    with pytest.raises(RuntimeError, match=r"not deterministic.*peekcore.capture"):
        peekcore.cp_als(src, 2, n_iter_max=2)
    # random operations are reseeded per batch: reproducible with a seed, refused without
    seeded = ModelSource(Wrap(Noisy()), images, "m", batch_size=8, seed=5)
    a, b = (torch.cat(list(seeded.chunks(20))) for _ in range(2))
    assert torch.equal(a, b)
    unseeded = ModelSource(Wrap(Noisy()), images, "m", batch_size=8, seed=None)
    with pytest.raises(RuntimeError, match="different activations for the same first batch"):
        list(unseeded.chunks(20))


class Wrap(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, x):
        return self.m(x)


def test_model_source_checks_layer_argument(images):
    with pytest.raises(TypeError, match="one layer"):
        ModelSource(SmallCNN(), images, ["conv1", "conv2"])


def test_capture_options_show_in_the_signatures_and_wrong_ones_are_refused(images, tmp_path):
    import inspect

    from peekcore.capture import CaptureOptions

    options = [f.name for f in dataclasses.fields(CaptureOptions)]
    cap_sig = inspect.signature(peekcore.capture).parameters
    src_sig = inspect.signature(ModelSource).parameters
    for name in options:  # what help() shows
        assert cap_sig[name].kind == src_sig[name].kind == inspect.Parameter.KEYWORD_ONLY
    assert {"chunk_size", "check_finite", "overwrite", "progress"} <= set(cap_sig)
    assert not any(p.kind == p.VAR_KEYWORD for p in [*cap_sig.values(), *src_sig.values()])
    assert cap_sig["dtype"].default == "float16" and src_sig["dtype"].default == "float32"
    assert ModelSource(SmallCNN(), images, "conv1").dtype == "float32"
    with pytest.raises(TypeError, match="unexpected keyword argument 'batchsize'"):
        peekcore.capture(SmallCNN(), images, "conv1", tmp_path / "s.zarr", batchsize=8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunk_size'"):
        ModelSource(SmallCNN(), images, "conv1", chunk_size=8)
    assert not (tmp_path / "s.zarr").exists()
    store = peekcore.capture(
        SmallCNN(), images, "conv1", tmp_path / "t.zarr", batch_size=7, n_samples=20,
        dtype="float32",
    )  # fmt: skip
    assert store.n_samples == 20 and store.dtype == "float32"


# ---------------------------------------------------------------- sample order, streams


class Reversed(torch.utils.data.Sampler):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self) -> int:
        return self.n


def test_loader_samplers_other_than_sequential_are_refused(images, tmp_path):
    from torch.utils.data import (
        BatchSampler,
        RandomSampler,
        SequentialSampler,
        SubsetRandomSampler,
        WeightedRandomSampler,
    )

    ds = TensorDataset(torch.from_numpy(images))
    n = len(images)
    refused = {
        "SubsetRandomSampler": DataLoader(ds, batch_size=8, sampler=SubsetRandomSampler(range(n))),
        "WeightedRandomSampler": DataLoader(
            ds, batch_size=8, sampler=WeightedRandomSampler(torch.ones(n), n)
        ),
        "Reversed": DataLoader(ds, batch_size=8, sampler=Reversed(n)),
        "BatchSampler": DataLoader(
            ds, batch_sampler=BatchSampler(RandomSampler(ds), batch_size=8, drop_last=False)
        ),
        "list": DataLoader(
            ds, batch_sampler=[list(range(i, min(i + 8, n))) for i in range(0, n, 8)]
        ),
    }
    for name, loader in refused.items():
        with pytest.raises(ValueError, match=rf"{name}.*fixed order.*sample ids.*resumes.*Subset"):
            cap(SmallCNN(), loader, "conv1", tmp_path / f"{name}.zarr")
        assert not (tmp_path / f"{name}.zarr").exists()
    # the sequential order, however it is spelled, is taken
    model = SmallCNN()
    ref = reference_cnn(model, images, 8)["conv1"]
    taken = {
        "explicit": (DataLoader(ds, batch_size=8, sampler=SequentialSampler(ds)), n),
        "batch_sampler": (
            DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 8, drop_last=True)),
            n - n % 8,
        ),
    }
    for name, (loader, want_n) in taken.items():
        store = cap(model, loader, "conv1", tmp_path / f"{name}.zarr", dtype="float32")
        assert store["conv1"].shape[0] == want_n
        np.testing.assert_allclose(store["conv1"][:], ref[:want_n], rtol=1e-6, atol=1e-6)


class Stream(torch.utils.data.IterableDataset):
    """The rows of an array, streamed; with ``sized``, it has a length too."""

    def __init__(self, x: np.ndarray, y: np.ndarray, sized: bool = False) -> None:
        self.x, self.y, self.sized = x, y, sized

    def __iter__(self):
        for xi, yi in zip(self.x, self.y, strict=True):
            yield torch.from_numpy(xi), int(yi)

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError("a stream of unknown length")
        return len(self.x)


def test_iterable_dataset_is_captured_with_n_samples(images, tmp_path, rng):
    labels = rng.integers(0, 7, len(images))
    model = SmallCNN()
    ref = reference_cnn(model, images, 8)["conv2"]
    loader = DataLoader(Stream(images, labels), batch_size=8)
    with pytest.raises(TypeError, match="pass n_samples="):
        cap(model, loader, "conv2", tmp_path / "none.zarr")
    kw = dict(dtype="float32", chunk_size=8)
    store = cap(model, loader, "conv2", tmp_path / "s.zarr", n_samples=20, **kw)
    assert store["conv2"].shape == (20, 10, 8, 8)
    np.testing.assert_allclose(store["conv2"][:], ref[:20], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(store.labels, labels[:20])
    sized = cap(
        model,
        DataLoader(Stream(images, labels, sized=True), batch_size=8),
        "conv2",
        tmp_path / "sized.zarr",
        **kw,
    )
    np.testing.assert_allclose(sized["conv2"][:], ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"fewer samples than the 60"):
        cap(model, loader, "conv2", tmp_path / "short.zarr", n_samples=60, **kw)
    live = ModelSource(model, loader, "conv2", n_samples=30, batch_size=8)
    np.testing.assert_allclose(torch.cat(list(live.chunks(16))).numpy(), ref[:30], atol=1e-6)


# ---------------------------------------------------------------- resume settings


def make_scale(factor: float):
    def scale(t):
        return t * factor

    return scale


class Halve:
    def __call__(self, t):
        return t / 2


def test_function_transforms_resume_across_processes(images, tmp_path, monkeypatch):
    """A transform is described without memory addresses, which change from run to run."""
    from test_store import Failing, files

    kw = dict(dtype="float32", batch_size=8, chunk_size=8)
    for name, make in {"function": lambda: make_scale(2.0), "object": Halve}.items():
        path = tmp_path / f"{name}.zarr"
        monkeypatch.setattr(Failing, "budget", 3)
        with pytest.raises(KeyboardInterrupt):
            cap(Failing(), images, "conv1", path, transform=make(), **kw)
        # the same transform, a new object (at another address, as in a new process)
        monkeypatch.setattr(Failing, "budget", -1)
        resumed = cap(Failing(), images, "conv1", path, transform=make(), **kw)
        want = {
            "function": r"test_capture\.make_scale\.<locals>\.scale \[[0-9a-f]{12}\]",
            "object": r"<test_capture\.Halve object>",
        }[name]
        assert re.fullmatch(want, resumed.attrs["settings"]["transform"])
        fresh = cap(
            Failing(), images, "conv1", tmp_path / f"{name}-fresh.zarr", transform=make(), **kw
        )
        assert files(resumed.path) == files(fresh.path)
        factor = 2.0 if name == "function" else 0.5
        want = reference_cnn(SmallCNN(), images * factor, 8)["conv1"]
        np.testing.assert_allclose(resumed["conv1"][:], want, rtol=1e-5, atol=1e-5)


def test_numpy_integers_are_taken_for_integers(images, tmp_path):
    kw = dict(dtype="float32")
    model = Wrap(Noisy())  # random in its forward: the seed matters
    plain = capture(
        model,
        images,
        "m",
        tmp_path / "plain.zarr",
        seed=3,
        n_samples=40,
        batch_size=8,
        chunk_size=16,
        **kw,
    )
    numpy = capture(
        model,
        images,
        "m",
        tmp_path / "numpy.zarr",
        seed=np.int64(3),
        n_samples=np.int64(40),
        batch_size=np.int32(8),
        chunk_size=np.int64(16),
        **kw,
    )
    np.testing.assert_array_equal(numpy["m"][:], plain["m"][:])
    assert numpy.attrs["settings"] == plain.attrs["settings"]
    assert numpy.provenance["seed"] == 3
    src = ModelSource(model, images, "m", batch_size=8, seed=np.int64(3), n_samples=40)
    np.testing.assert_array_equal(torch.cat(list(src.chunks(16))).numpy(), plain["m"][:])
    with pytest.raises(TypeError, match="seed must be None or a nonnegative integer"):
        capture(model, images, "m", tmp_path / "float.zarr", seed=1.5, **kw)
    with pytest.raises(ValueError, match="seed must be None or a nonnegative integer"):
        capture(model, images, "m", tmp_path / "negative.zarr", seed=-1, **kw)


# ---------------------------------------------------------------- hooks outside their passes


def test_suspended_model_source_passes_leave_the_model_alone(images):
    model = SmallCNN()
    model.train()
    model.relu2.eval()  # flags of their own, to be restored as they were
    flags = [m.training for m in model.modules()]
    src = ModelSource(model, images, "conv1", batch_size=8)
    ref = reference_cnn(model, images, 8)["conv1"]
    x = torch.from_numpy(images[:5])
    with torch.no_grad():
        plain = model(x)
    first = src.chunks(16)
    np.testing.assert_allclose(next(first).numpy(), ref[:16], rtol=1e-6, atol=1e-6)
    # the pass is suspended: the model is the caller's, hooks or not
    assert [m.training for m in model.modules()] == flags
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    second = src.chunks(8)  # and a second pass meanwhile
    np.testing.assert_allclose(next(second).numpy(), ref[:8], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(next(first).numpy(), ref[16:32], rtol=1e-6, atol=1e-6)
    first.close()  # the first pass ends before the second
    assert [m.training for m in model.modules()] == flags
    rest = torch.cat(list(second)).numpy()
    np.testing.assert_allclose(rest, ref[8:], rtol=1e-6, atol=1e-6)
    assert [m.training for m in model.modules()] == flags
    assert not model.conv1._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


def test_layer_hooks_nest_and_act_only_in_their_forwards(images):
    from peekcore.capture import LayerHooks

    model = SmallCNN()
    model.train()
    model.pool.eval()
    flags = [m.training for m in model.modules()]
    hooks = LayerHooks(
        model,
        resolve_layers(model, ["conv1", "conv2"]),
        dtype=torch.float32,
        layout={"conv1": "auto", "conv2": "auto"},
        select={"conv1": None, "conv2": None},
        fold_spatial=False,
        device=torch.device("cpu"),
        autocast=None,
    )
    x = torch.from_numpy(images[:8])
    ref = reference_cnn(model, images[:8], 8)
    with torch.no_grad():
        plain = model(x)
    with hooks:
        with hooks:  # nested: the outer entry's flags and hooks stay
            hooks.run(x)
        assert not any(m.training for m in model.modules())
        assert len(model.conv1._forward_hooks) == 1
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain)  # the owner's forward, unhooked
        got = hooks.run(x)  # stops early after conv2
        for name in ("conv1", "conv2"):
            np.testing.assert_allclose(got[name].numpy(), ref[name], rtol=1e-6, atol=1e-6)
    assert [m.training for m in model.modules()] == flags
    assert not model.conv1._forward_hooks and not model.conv2._forward_hooks


# ---------------------------------------------------------------- ModelSource and NaN


class LogNet(nn.Module):
    """A deterministic model whose outputs hold NaN (logs of negatives) and -Inf."""

    def __init__(self, noisy: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.log = nn.Identity()
        self.noisy = noisy

    def forward(self, x):
        h = self.conv(x)
        if self.noisy:
            h = h + torch.randn_like(h)
        h = torch.where(h.abs() < 0.05, torch.zeros_like(h), h)  # log(0) = -Inf
        return self.log(torch.log(h))


def test_model_source_compares_bits_so_nan_is_no_difference(images):
    model = LogNet()
    src = ModelSource(model, images, "log", batch_size=8)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    assert np.isnan(want).any()
    for size in (8, 20):
        got = torch.cat(list(src.chunks(size))).numpy()
        np.testing.assert_array_equal(got, want)  # NaN where want has NaN
    assert src.passes == 2
    noisy = ModelSource(LogNet(noisy=True), images, "log", batch_size=8, seed=None)
    with pytest.raises(RuntimeError, match=r"not deterministic.*hold NaN/Inf \(\d+ values"):
        list(noisy.chunks(8))


def test_transforms_that_share_a_name_are_told_apart():
    """Two lambdas of one module, or two closures of one factory, share a qualified name;
    a capture with one must not be taken for a capture with the other."""
    from peekcore.datasets import describe_callable

    def scale_by(k):
        def tf(x):
            return x * k

        return tf

    double, triple = (lambda x: x * 2.0), (lambda x: x * 3.0)  # noqa: E731
    assert describe_callable(double) != describe_callable(triple)
    assert describe_callable(scale_by(2.0)) != describe_callable(scale_by(3.0))
    assert describe_callable(scale_by(2.0)) == describe_callable(scale_by(2.0))
    assert "0x" not in describe_callable(scale_by(object()))  # no addresses, ever


def test_a_store_is_not_reused_for_another_transform(tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 3, 4, 4)).astype(np.float32)

    def scale_by(k):
        return lambda t: t * k

    kw = dict(chunk_size=4)
    model = nn.Sequential(nn.Identity())
    capture(model, x, "0", tmp_path / "s.zarr", transform=scale_by(2.0), **kw)
    with pytest.raises(peekcore.store.StoreError, match="transform"):
        capture(model, x, "0", tmp_path / "s.zarr", transform=scale_by(3.0), **kw)
