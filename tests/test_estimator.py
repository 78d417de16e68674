"""peekcore.CP, the scikit-learn-style estimator: fit, transforms, parameters, pipelines."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from reference import low_rank
from scipy.optimize import nnls

import peekcore


def _kr(factors):
    kr = factors[0]
    for f in factors[1:]:
        kr = np.einsum("ir,jr->ijr", kr, f).reshape(-1, f.shape[1])
    return kr


def test_fit_attributes_and_transform_against_lstsq(rng):
    x, _ = low_rank(rng, (60, 5, 6), 3, noise=0.05)
    est = peekcore.CP(3, random_state=1, n_iter_max=50)
    features = est.fit_transform(x)
    assert features.shape == (60, 3) and est.n_iter_ == len(est.model_.history.fit) <= 50
    assert [c.shape for c in est.components_] == [(5, 3), (6, 3)]
    np.testing.assert_allclose([np.linalg.norm(c, axis=0) for c in est.components_], 1.0)
    resid = np.linalg.norm(x - est.inverse_transform(features))
    assert est.reconstruction_err_ == pytest.approx(resid, rel=1e-6)
    x_new = rng.standard_normal((7, 5, 6))
    kr = _kr(est.components_)
    want = np.linalg.lstsq(kr, x_new.reshape(7, -1).T, rcond=None)[0].T
    np.testing.assert_allclose(est.transform(x_new), want, rtol=1e-9, atol=1e-10)


def test_nonnegative_transform_against_scipy_nnls(rng):
    x, _ = low_rank(rng, (50, 4, 7), 2, noise=0.1)
    x = np.abs(x)
    est = peekcore.CP(3, nonnegative=True, random_state=0, n_iter_max=30).fit(x)
    assert all(np.all(c >= 0) for c in est.components_)
    x_new = np.abs(rng.standard_normal((6, 4, 7)))
    kr = _kr(est.components_)
    want = np.stack([nnls(kr, row)[0] for row in x_new.reshape(6, -1)])
    got = est.transform(x_new)
    assert np.all(got >= 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_sample_shape_folds_rows_and_errors_name_the_fix(rng):
    x, _ = low_rank(rng, (30, 4, 5), 2)
    flat = x.reshape(30, 20)
    est = peekcore.CP(2, sample_shape=(4, 5), n_iter_max=20)
    a = est.fit_transform(flat)
    assert est.inverse_transform(a).shape == (30, 20)
    same = peekcore.CP(2, n_iter_max=20)  # the same fit on the unfolded samples
    np.testing.assert_allclose(a, same.fit_transform(x), rtol=1e-12, atol=1e-12)
    want = same.inverse_transform(a).reshape(30, 20)
    np.testing.assert_allclose(est.inverse_transform(a), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="sample_shape"):  # a matrix's rank <= min(n, f)
        peekcore.CP(3).fit(flat[:, :2])
    with pytest.raises(ValueError, match="prod"):
        peekcore.CP(2, sample_shape=(3, 5)).fit(flat)
    with pytest.raises(AttributeError, match="not fitted"):
        peekcore.CP(2).transform(x)
    with pytest.raises(ValueError, match="fitted on"):
        peekcore.CP(2).fit(x).transform(x[:, :3])
    with pytest.raises(ValueError, match="invalid parameter"):
        peekcore.CP(2).set_params(ranks=3)


def test_params_clone_and_pickle(rng):
    sklearn_base = pytest.importorskip("sklearn.base")
    est = peekcore.CP(4, nonnegative=True, sample_shape=(2, 3), tol=1e-6)
    assert est.get_params()["rank"] == 4 and est.set_params(rank=5).rank == 5
    twin = sklearn_base.clone(est)
    assert twin is not est and twin.get_params() == est.get_params()
    assert repr(twin) == "CP(rank=5, nonnegative=True, sample_shape=(2, 3), tol=1e-06)"
    x = np.abs(rng.standard_normal((20, 6)))
    est.fit(x)
    back = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(back.transform(x), est.transform(x))


@pytest.mark.slow
@pytest.mark.parametrize("nonnegative", [False, True])
def test_pipeline_on_digits(nonnegative):
    datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = datasets.load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    pipe = make_pipeline(
        peekcore.CP(12, nonnegative=nonnegative, sample_shape=(8, 8), n_iter_max=60),
        StandardScaler(),
        LogisticRegression(max_iter=2000),
    )
    pipe.fit(x_tr, y_tr)
    accuracy = pipe.score(x_te, y_te)
    # 12 CP features of 8 x 8 images separate the ten digits far above chance (0.1)
    assert accuracy > 0.85, accuracy


@pytest.mark.slow  # a fresh interpreter importing torch: 6 s under load
def test_import_leaves_sklearn_out():
    import subprocess
    import sys

    code = (
        "import sys, numpy, peekcore; x = numpy.eye(5)[:, :3];"
        " peekcore.CP(2).fit(x).transform(x); assert 'sklearn' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
