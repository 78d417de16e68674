"""peekcore.CP as scikit-learn expects: plain matrices, feature names, set_output, its checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.optimize import nnls

import peekcore

pytest.importorskip("sklearn")


def _matrix(rng, n, f, rank, noise=0.01):
    """``n x f`` of rank ``rank`` plus noise, and its sample factor (``n x rank``)."""
    a = rng.standard_normal((n, rank))
    b = np.linalg.qr(rng.standard_normal((f, rank)))[0] * np.arange(rank + 2, 2, -1)
    return a @ b.T + noise * rng.standard_normal((n, f)), a


def test_matrix_is_a_truncated_svd(rng):
    x, _ = _matrix(rng, 80, 9, 3, noise=0.3)
    est = peekcore.CP(3, tol=1e-14, n_iter_max=500)
    features = est.fit_transform(x)
    assert features.shape == (80, 3) and est.n_features_in_ == 9
    assert [c.shape for c in est.components_] == [(9, 3)]
    np.testing.assert_allclose(np.linalg.norm(est.components_[0], axis=0), 1.0)
    # Eckart-Young: the best rank-3 approximation leaves the trailing singular values
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    assert est.reconstruction_err_ == pytest.approx(np.sqrt(np.sum(s[3:] ** 2)), rel=1e-6)
    resid = np.linalg.norm(x - est.inverse_transform(features))
    assert est.reconstruction_err_ == pytest.approx(resid, rel=1e-6)
    # the components span the top-3 right singular subspace
    q = np.linalg.qr(est.components_[0])[0]
    np.testing.assert_allclose(q @ q.T, vt[:3].T @ vt[:3], atol=1e-6)
    x_new = rng.standard_normal((5, 9))
    want = np.linalg.lstsq(est.components_[0], x_new.T, rcond=None)[0].T
    np.testing.assert_allclose(est.transform(x_new), want, rtol=1e-9, atol=1e-10)
    assert est.inverse_transform(want).shape == (5, 9)
    assert est.model_.shape == (80, 9)


def test_nonnegative_matrix(rng):
    x = np.abs(_matrix(rng, 40, 6, 2)[0])
    est = peekcore.CP(2, nonnegative=True, n_iter_max=50).fit(x)
    (b,) = est.components_
    assert np.all(b >= 0)
    x_new = np.abs(rng.standard_normal((4, 6)))
    want = np.stack([nnls(b, row)[0] for row in x_new])
    np.testing.assert_allclose(est.transform(x_new), want, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="Negative values in data.*smallest is -1.5"):
        peekcore.CP(2, nonnegative=True).fit(x - 1.5 - x.min())


def test_matrix_input_errors_say_what_to_do(rng):
    x = rng.standard_normal((10, 4))
    with pytest.raises(ValueError, match=r"rank 5 is too high .* 10 sample\(s\) x 4 feature"):
        peekcore.CP(5).fit(x)
    with pytest.raises(ValueError, match="Reshape your data"):
        peekcore.CP(2).fit(x[0])
    with pytest.raises(ValueError, match="Complex data not supported"):
        peekcore.CP(2).fit(x + 1j)
    est = peekcore.CP(2).fit(x.astype(object))  # numbers in an object array are numbers
    np.testing.assert_allclose(est.transform(x), peekcore.CP(2).fit(x).transform(x))
    bad = x.astype(object)
    bad[1, 2] = "a"
    with pytest.raises(TypeError, match="not a number"):
        peekcore.CP(2).fit(bad)
    with pytest.raises(ValueError, match="X has 3 features, but CP is expecting 4 features"):
        est.transform(x[:, :3])


def test_feature_names_and_set_output(rng):
    pd = pytest.importorskip("pandas")
    from sklearn.base import clone
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, _ = _matrix(rng, 30, 5, 2)
    frame = pd.DataFrame(x, columns=list("abcde"), index=np.arange(100, 130))
    est = peekcore.CP(2).fit(frame)
    assert list(est.feature_names_in_) == list("abcde") and est.n_features_in_ == 5
    assert list(est.get_feature_names_out()) == ["cp0", "cp1"]
    plain = est.transform(frame)
    assert isinstance(plain, np.ndarray)
    out = est.set_output(transform="pandas").transform(frame)
    assert list(out.columns) == ["cp0", "cp1"] and list(out.index) == list(frame.index)
    np.testing.assert_array_equal(out.to_numpy(), plain)
    twin = clone(est).fit(frame)  # the output setting travels with clone, as scikit-learn's does
    assert list(twin.fit_transform(frame).columns) == ["cp0", "cp1"]
    for other in (frame.rename(columns={"a": "z"}), frame[["a", "b", "c"]]):
        with pytest.raises(ValueError, match="feature names should match"):
            est.transform(other)
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        est.transform(x)
    # a refit on an array forgets the names
    assert not hasattr(peekcore.CP(2).fit(frame).fit(x), "feature_names_in_")

    pipe = make_pipeline(StandardScaler(), peekcore.CP(2)).set_output(transform="pandas")
    out = pipe.fit_transform(frame)
    assert list(out.columns) == ["cp0", "cp1"] and list(out.index) == list(frame.index)
    np.testing.assert_allclose(out.to_numpy(), pipe.transform(frame).to_numpy(), atol=1e-6)


def test_tensor_feature_names_and_unfitted(rng):
    from sklearn.exceptions import NotFittedError

    est = peekcore.CP(3)
    with pytest.raises(NotFittedError):
        est.get_feature_names_out()
    est.fit(rng.standard_normal((20, 3, 4)))
    assert est.n_features_in_ == 12
    assert list(est.get_feature_names_out()) == ["cp0", "cp1", "cp2"]
    with pytest.raises(ValueError, match="input_features should have length"):
        est.get_feature_names_out(["a", "b"])


def test_grid_search_over_rank(rng):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    # the label is the sign of the third (weakest) component: rank 1 cannot see it
    x, a = _matrix(rng, 150, 10, 3, noise=0.05)
    y = (a[:, 2] > 0).astype(int)
    pipe = Pipeline([("cp", peekcore.CP(n_iter_max=50)), ("clf", LogisticRegression())])
    search = GridSearchCV(pipe, {"cp__rank": [1, 3]}, cv=3).fit(x, y)
    assert search.best_params_ == {"cp__rank": 3}
    scores = search.cv_results_["mean_test_score"]
    assert scores[1] > 0.9 and scores[0] < 0.75, scores


# scikit-learn's checks of DataFrames and set_output, which check_estimator leaves out
# (scikit-learn runs them on its own transformers); polars' are left out with polars
_FRAME_CHECKS = [
    "check_get_feature_names_out_error",
    "check_dataframe_column_names_consistency",
    "check_transformer_get_feature_names_out",
    "check_transformer_get_feature_names_out_pandas",
    "check_set_output_transform",
    "check_set_output_transform_pandas",
    "check_global_output_transform_pandas",
]


@pytest.mark.slow  # 6 s each
@pytest.mark.parametrize("nonnegative", [False, True])
def test_sklearn_dataframe_and_set_output_checks(nonnegative):
    pytest.importorskip("pandas")
    from sklearn.utils import estimator_checks

    for name in _FRAME_CHECKS:
        with warnings.catch_warnings():
            # the set_output checks fit on a DataFrame and transform an array, and the
            # reverse, on purpose: scikit-learn's warnings of that are expected there
            warnings.filterwarnings("ignore", "X does not have valid feature names", UserWarning)
            warnings.filterwarnings("ignore", "X has feature names, but CP", UserWarning)
            getattr(estimator_checks, name)("CP", peekcore.CP(nonnegative=nonnegative))


def _checked():
    from sklearn.utils.estimator_checks import parametrize_with_checks

    with warnings.catch_warnings():  # CP is not a BaseEstimator: scikit-learn stays optional
        warnings.filterwarnings("ignore", "Estimator CP does not inherit", UserWarning)
        return parametrize_with_checks([peekcore.CP(), peekcore.CP(nonnegative=True)])


@pytest.mark.slow  # about 50 checks, each a few fits: 10-25 s on two busy cores
@_checked()
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
