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

import numpy as np
import pytest
import torch
from torch import nn

import peekcore
from peekcore import CP
from peekcore._lock import lock_path, writer_lock
from peekcore.errors import ConcurrentWriteError, OutputPathError

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


# ---------------------------------------------------------------- shared keyword options


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()


@pytest.mark.parametrize(
    ("call", "typo", "own"),
    [
        (lambda x, **kw: peekcore.ncp_hals(x, 2, **kw), "sweepz", "sweeps"),
        (
            lambda x, **kw: peekcore.capture(_tiny_net(), x, "0", "/nonexistent/s", **kw),
            "overwrit",
            "overwrite",
        ),
        (
            lambda x, **kw: peekcore.component_importance(_tiny_net(), "0", None, x, **kw),
            "label",
            "labels",
        ),
    ],
)
def test_a_wrong_keyword_lists_the_functions_own_keywords_too(rng, call, typo, own):
    x = rng.random((5, 4, 3)) if typo == "sweepz" else rng.random((5, 4)).astype(np.float32)
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{typo}'") as info:
        call(x, **{typo: 1})
    listed = str(info.value).split("keyword arguments are: ")[1].split(", ")
    assert own in listed  # its own keyword
    assert {"batch_size", "n_iter_max"} & set(listed)  # and the shared ones


def test_edited_outputs_names_a_typo_of_remove_before_asking_for_remove_or_keep(rng):
    x = rng.random((5, 4)).astype(np.float32)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'remov'.*\bremove\b"):
        peekcore.edited_outputs(_tiny_net(), "0", None, x, remov=[0])


# ---------------------------------------------------------------- the CP estimator


def test_repr_of_an_estimator_with_array_parameters(rng):
    est = CP(2, sample_shape=np.array([4, 4]), n_iter_max=np.int64(100), tol=1e-6)
    assert repr(est) == "CP(rank=2, sample_shape=array([4, 4]), tol=1e-06)"
    est.fit(rng.random((6, 16)))  # the array shape is usable as given
    assert est.transform(rng.random((3, 16))).shape == (3, 2)


# ---------------------------------------------------------------- inputs and images


def _linear_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh()).eval()


@pytest.mark.parametrize(("dtype", "from_file"), [(">f4", True), (">f8", False), (">i4", True)])
def test_big_endian_inputs_are_captured_as_their_values(tmp_path, rng, dtype, from_file):
    x = (rng.random((9, 4)) * 20).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    model = _linear_net() if dtype != ">i4" else nn.Sequential(nn.Embedding(20, 3)).eval()
    data = tmp_path / "x.npy" if from_file else x
    store = peekcore.capture(model, data, ["0"], tmp_path / "s.zarr", dtype="float32")
    native = x.astype(x.dtype.newbyteorder("="))
    with torch.no_grad():  # float64 reference
        want = model.double()[0](
            torch.as_tensor(native if dtype == ">i4" else native.astype(float))
        )
    got = np.asarray(store["0"].read())
    want = want.numpy().transpose(0, 2, 1) if dtype == ">i4" else want.numpy()  # tokens: N x C x T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_uint8_from_a_dataloader_gets_advice_it_can_follow(tmp_path, rng):
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.as_tensor(rng.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8))
    loader = DataLoader(TensorDataset(images), batch_size=3)
    net = nn.Sequential(nn.Conv2d(1, 2, 3)).eval()
    with pytest.raises(peekcore.errors.InvalidTypeError, match=r"DataLoader.*its Dataset"):
        peekcore.capture(net, loader, ["0"], tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="put the transform in its Dataset"):  # transform= is not
        peekcore.capture(net, loader, ["0"], tmp_path / "s.zarr", transform=lambda t: t / 255)


@pytest.mark.parametrize("kind", ["complex", "torch complex", "structured"])
def test_report_images_that_are_no_real_numbers_are_refused(tmp_path, rng, kind):
    from peekcore.report import build_report

    model = peekcore.cp_als(rng.random((5, 2, 16)), 2, n_iter_max=3)
    images = rng.random((5, 4, 4)).astype(complex)
    if kind == "torch complex":
        images = torch.as_tensor(images)
    elif kind == "structured":
        images = np.zeros((5, 4, 4), dtype=[("v", "f4")])
        np.save(tmp_path / "s.npy", images)
        images = tmp_path / "s.npy"
    with pytest.raises(ValueError, match=r"images have dtype .*expected real numbers"):
        build_report({"L": model}, tmp_path / "r.html", images=images, components=1)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_report_images_path_that_is_no_regular_file_is_named_so(tmp_path, rng, kind):
    from peekcore.report import build_report

    model = peekcore.cp_als(rng.random((5, 2, 16)), 2, n_iter_max=3)
    path = tmp_path / "images.npy"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(peekcore.errors.DataError, match="is not a regular file"):
        build_report({"L": model}, tmp_path / "r.html", images=path, components=1)


def test_npy_array_refuses_a_boolean_row_index(tmp_path):
    from peekcore.npyfile import NpyArray

    np.save(tmp_path / "a.npy", np.arange(12.0).reshape(4, 3))
    rows = NpyArray(tmp_path / "a.npy")
    np.testing.assert_array_equal(rows[1], [3.0, 4.0, 5.0])
    with pytest.raises(TypeError, match="integer or a slice"):
        rows[True]


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("option", "flag"),
    [("--iters 0", "--iters"), ("--seed -1", "--seed"), ("--chunk-size 0", "--chunk-size")],
)
def test_peek_fit_names_the_flag_a_bad_setting_came_from(tmp_path, rng, capsys, option, flag):
    import json

    from peekcore.cli import main

    np.save(tmp_path / "x.npy", rng.random((6, 4, 3)))
    code = main(["--json", "fit", str(tmp_path / "x.npy"), "--rank", "2", *option.split()])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["error"].startswith(f"{flag} must be")
    assert not any(name in doc["error"] for name in ("n_iter_max", "random_state", "chunk_size"))


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_cp_transform_refuses_nan_and_inf_samples(rng, nonnegative, bad):
    est = CP(2, sample_shape=(4, 4), nonnegative=nonnegative, n_iter_max=20).fit(
        rng.random((12, 16))
    )
    x = rng.random((4, 16))
    clean = est.transform(np.delete(x, 2, axis=0))
    x[2, 5] = bad
    with pytest.raises(peekcore.errors.DataError, match=r"NaN or Inf in 1 sample\(s\).*sample 2"):
        est.transform(x)
    # the other samples were never at risk: dropping the bad one gives their rows
    np.testing.assert_allclose(est.transform(np.delete(x, 2, axis=0)), clean, rtol=1e-12)


def test_cp_names_sparse_input(rng):
    import scipy.sparse

    with pytest.raises(TypeError, match=r"sparse csr_matrix.*X.toarray\(\)"):
        CP(2, sample_shape=(4, 4)).fit(scipy.sparse.csr_matrix(rng.random((6, 16))))


def test_cp_subclass_parameters_survive_clone_and_set_params():
    from sklearn.base import clone

    class Listed(CP):  # scikit-learn's convention: every parameter named
        def __init__(self, rank=2, *, alpha=1.0, tol=1e-8):
            super().__init__(rank, tol=tol)
            self.alpha = alpha

    class Passing(CP):  # the parent's parameters passed on as **kwargs
        def __init__(self, rank=2, *, alpha=1.0, **kwargs):
            super().__init__(rank, **kwargs)
            self.alpha = alpha

    for cls in (Listed, Passing):
        est = cls(3, alpha=5.0, tol=1e-3)
        twin = clone(est)
        assert (type(twin), twin.rank, twin.alpha, twin.tol) == (cls, 3, 5.0, 1e-3)
        assert est.set_params(alpha=2.0).alpha == 2.0
        assert repr(est) == f"{cls.__name__}(rank=3, alpha=2.0, tol=0.001)"
    assert "nonnegative" in Passing().get_params() and "nonnegative" not in Listed().get_params()


def test_a_lock_file_this_user_may_only_read_still_locks(tmp_path, monkeypatch):
    # another user's lock file, mode 0644: this one may open it read-only, which flock needs
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    target = tmp_path / "s.zarr"
    with writer_lock(target, "the store", "wait"):  # the other user, writing
        monkeypatch.setattr(os, "open", read_only)
        with pytest.raises(ConcurrentWriteError, match=f"process {os.getpid()} is writing"):
            _lock_once(target)
        monkeypatch.undo()
    lock_path(target).write_text("")  # left by the other user, who is done
    monkeypatch.setattr(os, "open", read_only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # locked, so no warning
        assert _lock_once(target)


def test_a_second_capture_is_refused_before_it_reads_the_data(tmp_path):
    from torch.utils.data import Dataset

    class Counted(Dataset):
        def __init__(self) -> None:
            self.x, self.reads = torch.ones(40, 4), 0

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> torch.Tensor:
            self.reads += 1
            return self.x[i]

    data = Counted()
    with writer_lock(tmp_path / "s.zarr", "the store", "wait"):  # the first writer
        with pytest.raises(ConcurrentWriteError):
            peekcore.capture(_linear_net(), data, ["0"], tmp_path / "s.zarr")
    # refused at once: not after reading the data set for its fingerprint
    assert data.reads <= 1
    peekcore.capture(_linear_net(), data, ["0"], tmp_path / "s.zarr")
    assert data.reads > 40  # the capture itself reads them all (and the fingerprint too)


def test_report_images_with_nan_or_inf_pixels_are_drawn_on_the_finite_scale(rng):
    from peekcore.report.figures import _image

    img = rng.random((4, 4)) * 10 + 5  # outside [0, 1]: rescaled to its range
    img[0, 0], img[1, 1] = np.nan, np.inf
    got = _image(img[None], 0, "gray")
    finite = np.isfinite(img)
    lo, hi = img[finite].min(), img[finite].max()
    np.testing.assert_allclose(got[finite], (img[finite] - lo) / (hi - lo))
    assert np.isnan(got[~finite]).all()
    assert np.isnan(_image(np.full((1, 3, 3), np.nan), 0, "gray")).all()
    flat = np.full((1, 3, 3), 7.0)
    flat[0, 0, 0] = -np.inf
    got = _image(flat, 0, "gray")
    assert np.isnan(got[0, 0]) and (got.ravel()[1:] == 0).all()


def test_cp_takes_bfloat16_tensors_and_transforms_zero_samples(rng):
    x = rng.random((10, 16))
    as_bf16 = torch.as_tensor(x, dtype=torch.bfloat16)
    est = CP(2, sample_shape=(4, 4), n_iter_max=20).fit(as_bf16)
    want = CP(2, sample_shape=(4, 4), n_iter_max=20).fit(as_bf16.float().numpy())
    np.testing.assert_allclose(est.transform(x), want.transform(x), rtol=1e-6, atol=1e-9)
    assert est.transform(np.empty((0, 16))).shape == (0, 2)


def test_errors_with_attributes_survive_pickling():
    # what a worker process (concurrent.futures, joblib) sends its caller
    import pickle

    from peekcore.errors import CheckpointMismatchError

    for err in (
        ConcurrentWriteError("held by 12", "/data/s.zarr", 12, "node7"),
        CheckpointMismatchError("other data", {"shape": ((3, 4), (3, 5))}),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert vars(back) == vars(err)


def test_capture_through_a_symlink_resumes_or_replaces_the_store_it_names(tmp_path, rng):
    x, y = rng.random((10, 4)).astype(np.float32), rng.random((10, 4)).astype(np.float32)
    (tmp_path / "real").mkdir()
    peekcore.capture(_linear_net(), x, ["0"], tmp_path / "real" / "s.zarr", dtype="float32")
    link = tmp_path / "link.zarr"
    link.symlink_to(tmp_path / "real" / "s.zarr")
    with writer_lock(link, "the store", "wait"):  # one lock for every name of the store
        with pytest.raises(ConcurrentWriteError):
            peekcore.capture(_linear_net(), x, ["0"], tmp_path / "real" / "s.zarr")
    store = peekcore.capture(_linear_net(), y, ["0"], link, dtype="float32", overwrite=True)
    assert link.is_symlink()  # still names the store, which now holds y's activations
    with torch.no_grad():
        want = _linear_net().double()[0](torch.as_tensor(y, dtype=torch.float64)).numpy()
    for opened in (store, peekcore.ActivationStore(link)):
        np.testing.assert_allclose(np.asarray(opened["0"].read()), want, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.zarr", "real"]  # nothing left
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["s.zarr"]


@pytest.mark.parametrize("dtype", [[("a", "f4")], "datetime64[s]", "U3"])
@pytest.mark.parametrize("from_file", [False, True])
def test_capture_names_inputs_of_a_dtype_no_model_takes(tmp_path, dtype, from_file):
    x = np.zeros((6, 4), dtype=dtype)
    np.save(tmp_path / "x.npy", x)
    data = tmp_path / "x.npy" if from_file else x
    with pytest.raises(peekcore.errors.InvalidTypeError, match=r"inputs have dtype .*give numbers"):
        peekcore.capture(_linear_net(), data, ["0"], tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()
