"""CPModel: normalization, save/load, TensorLy interop, reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

import peekcore
from peekcore.diagnostics import factor_match_score
from peekcore.model import CPModel, normalize_factors


def test_normalize_keeps_the_model(rng):
    factors = [rng.standard_normal((n, 4)) for n in (7, 5, 6)]
    w, f = normalize_factors(factors)
    np.testing.assert_allclose(ref.full(f, w), ref.full(factors), rtol=1e-12, atol=1e-12)
    assert np.all(np.diff(w) <= 0)


def test_save_load_roundtrip(tmp_path, rng):
    x, _ = ref.low_rank(rng, (20, 5, 4), 2, noise=0.1)
    m = peekcore.cp_als(x, 2, n_iter_max=5)
    m.save(tmp_path / "m.npz")
    back = CPModel.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(back.weights, m.weights)
    for a, b in zip(back.factors, m.factors, strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.history == m.history
    assert back.metadata == m.metadata


def test_load_refuses_other_files(tmp_path, rng):
    np.savez(tmp_path / "x.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="not a peekcore file: give a peekcore model file"):
        CPModel.load(tmp_path / "x.npz")
    good = tmp_path / "m.npz"
    CPModel(np.ones(2), [rng.standard_normal((n, 2)) for n in (4, 3, 5)]).save(good)
    blob = good.read_bytes()
    (tmp_path / "half.npz").write_bytes(blob[: len(blob) // 2])  # an interrupted copy
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "plain.npy", np.ones((3, 4)))
    np.savez(tmp_path / "list.npz", header=np.frombuffer(b"[1, 2]", np.uint8))
    for name, why in (
        ("half.npz", "not a readable peekcore file"),
        ("empty.npz", "not a readable peekcore file"),
        ("plain.npy", r"a plain NumPy array \(shape \(3, 4\)"),
        ("list.npz", "not a peekcore header"),
    ):
        with pytest.raises(ValueError, match=why):
            CPModel.load(tmp_path / name)
        with pytest.raises(ValueError, match=why):
            peekcore.cp_als(rng.random((4, 3, 5)), 2, resume=tmp_path / name)


def test_saved_files_keep_the_users_file_mode_and_numpy_metadata(tmp_path, rng):
    import os

    model = CPModel(np.ones(2), [rng.standard_normal((n, 2)) for n in (4, 3, 5)])
    model.metadata.update(seed=np.int64(5), flag=np.bool_(True), scale=np.float32(0.5))
    model.metadata["labels"] = np.arange(3)
    old = os.umask(0o027)
    try:
        model.save(tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.npz").st_mode & 0o777 == 0o640  # not mkstemp's 0600
    os.chmod(tmp_path / "m.npz", 0o664)
    model.save(tmp_path / "m.npz")  # overwriting keeps the file's mode
    assert os.stat(tmp_path / "m.npz").st_mode & 0o777 == 0o664
    meta = CPModel.load(tmp_path / "m.npz").metadata
    assert meta["seed"] == 5 and isinstance(meta["seed"], int)
    assert meta["flag"] is True and meta["scale"] == 0.5 and meta["labels"] == [0, 1, 2]
    model.metadata["bad"] = object()
    with pytest.raises(TypeError, match="metadata values must be numbers"):
        model.save(tmp_path / "m2.npz")


def test_to_tensorly_roundtrip(rng):
    pytest.importorskip("tensorly")
    from tensorly.cp_tensor import cp_to_tensor

    x, _ = ref.low_rank(rng, (15, 4, 5), 2)
    m = peekcore.cp_als(x, 2, n_iter_max=50)
    cp = m.to_tensorly()
    np.testing.assert_allclose(cp_to_tensor(cp), m.reconstruct(), rtol=1e-12, atol=1e-12)
    back = CPModel.from_tensorly(cp)
    assert factor_match_score(back, m) == pytest.approx(1.0)


def test_reconstruct_range_matches_full(rng):
    x, _ = ref.low_rank(rng, (12, 3, 4, 2), 2)
    m = peekcore.cp_als(x, 2, n_iter_max=30)
    full = m.reconstruct()
    np.testing.assert_allclose(m.reconstruct(slice(3, 7)), full[3:7], rtol=1e-13)
    assert m.norm() == pytest.approx(np.linalg.norm(full), rel=1e-10)


def test_factor_match_score_properties(rng):
    factors = [rng.standard_normal((n, 3)) for n in (8, 5, 6)]
    assert factor_match_score(factors, factors) == pytest.approx(1.0)
    perm = [2, 0, 1]
    scaled = [f[:, perm] * s for f, s in zip(factors, (2.0, -0.5, -1.0), strict=True)]
    assert factor_match_score(factors, scaled) == pytest.approx(1.0)
    other = [rng.standard_normal((n, 3)) for n in (8, 5, 6)]
    assert factor_match_score(factors, other) < 0.5


def test_build_info_reports_the_build():
    info = peekcore.build_info()
    assert info["peekcore"] == peekcore.__version__
    if info["native"]:
        assert isinstance(info["openmp"], bool)
        assert "OpenBLAS" in info["blas"]
        assert info["cpu_kernels"] in ("avx512", "blas")
        assert info["cxx_standard"] >= 201703
        assert info["cuda"] in (True, False)
