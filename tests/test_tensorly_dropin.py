"""TensorLy's own CP tests, run against peekcore.tensorly; and the drop-in's own contract.

The installed TensorLy's ``decomposition/tests/test_cp.py`` is copied at test
time, its relative imports made absolute, and its ``parafac``,
``non_negative_parafac_hals``, ``CP`` and ``CP_NN_HALS`` pointed at
peekcore's. Two blocks exercise options the drop-in refuses (``sparsity`` in
``test_parafac``, ``nn_modes={0}`` in ``test_non_negative_parafac``): they are
cut out, each located by its exact text so that a changed TensorLy test fails
here instead of passing silently. Excluded parameters (README, "TensorLy
drop-in"): ``linesearch=True``, ``orthogonalise=True``, ``complex=True``
(refused), and ``hals=False`` (TensorLy's multiplicative-update NCP, not
provided).
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

tl = pytest.importorskip("tensorly")

import peekcore.tensorly as pk  # noqa: E402

SPARSE_BLOCK = ("    # Check that sparse component works\n", "    with np.testing.assert_raises")
NN_MODES_BLOCK = (
    "        # Regression test: used wrong variable for convergence checking\n",
    "    else:\n        assert_class_wrapper_correctly_passes_arguments(",
)
IMPORTS = {
    "from .._cp import": "from tensorly.decomposition._cp import",
    "from .._nn_cp import": "from tensorly.decomposition._nn_cp import",
    "from ...cp_tensor import": "from tensorly.cp_tensor import",
    "from ...random import": "from tensorly.random import",
    "from ...tenalg import": "from tensorly.tenalg import",
    "from ... import backend as T": "from tensorly import backend as T",
    "from ...testing import": "from tensorly.testing import",
    "from ...metrics.factors import": "from tensorly.metrics.factors import",
}


def _cut(text: str, block: tuple[str, str]) -> str:
    start, end = block
    i = text.index(start)  # ValueError: TensorLy's test changed; update this file
    j = text.index(end, i)
    return text[:i] + text[j:]


@pytest.fixture(scope="module")
def tensorly_tests(tmp_path_factory):
    """TensorLy's test_cp.py as a module whose CP functions are peekcore's."""
    source = Path(tl.__file__).parent / "decomposition" / "tests" / "test_cp.py"
    text = source.read_text()
    for old, new in IMPORTS.items():
        assert old in text, f"TensorLy's test_cp.py no longer has {old!r}"
        text = text.replace(old, new)
    text = _cut(text, SPARSE_BLOCK)
    text = _cut(text, NN_MODES_BLOCK)
    path = tmp_path_factory.mktemp("tensorly_tests") / "tensorly_test_cp.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("tensorly_test_cp", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.parafac = pk.parafac
    module.non_negative_parafac_hals = pk.non_negative_parafac_hals
    module.CP = pk.CP
    module.CP_NN_HALS = pk.CP_NN_HALS
    yield module
    del sys.modules[spec.name]


PARAFAC_CASES = list(
    itertools.product([(1, 1), (3, 4)], ["svd", "random"], [False, True], [1, 1234])
)
NN_CASES = list(itertools.product([(1, 1), (3, 3)], ["svd", "random"], [False, True], [1, 2]))


# TensorLy's test, the arguments fixed to what the drop-in provides (the excluded
# options above), and the cases it runs with: (true rank, rank), init, normalize, seed
UPSTREAM = [
    ("test_parafac", dict(linesearch=False, orthogonalise=False, complex=False), PARAFAC_CASES),
    ("test_non_negative_parafac", dict(hals=True), NN_CASES),
]


def _upstream_cases():
    for test, fixed, cases in UPSTREAM:
        for ranks, init, normalize, seed in cases:
            name = f"{test.removeprefix('test_')}-true{ranks[0]}-rank{ranks[1]}-{init}"
            norm = "normalized" if normalize else "raw"
            yield pytest.param(
                test, fixed, ranks, init, normalize, seed, id=f"{name}-{norm}-{seed}"
            )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("test", "fixed", "ranks", "init", "normalize_factors", "random_state"), list(_upstream_cases())
)
def test_tensorlys_own_cp_test(
    tensorly_tests, monkeypatch, test, fixed, ranks, init, normalize_factors, random_state
):
    getattr(tensorly_tests, test)(
        true_rank=ranks[0],
        rank=ranks[1],
        init=init,
        normalize_factors=normalize_factors,
        random_state=random_state,
        monkeypatch=monkeypatch,
        **fixed,
    )


# ---------------------------------------------------------------- the drop-in's own contract


def _noisy_cp(rng, shape, rank, noise=0.01, nonneg=False):
    factors = [rng.random((n, rank)) if nonneg else rng.standard_normal((n, rank)) for n in shape]
    x = tl.cp_to_tensor((np.ones(rank), factors))
    return x + noise * (np.abs if nonneg else np.asarray)(rng.standard_normal(shape))


def test_random_init_iterates_like_tensorly(rng):
    """Same start (TensorLy's initialize_cp): the same iterates and errors, to rounding."""
    from tensorly.decomposition import parafac as tl_parafac

    x = _noisy_cp(rng, (25, 6, 7), 3)
    seen_pk, seen_tl = [], []
    got, err_pk = pk.parafac(
        x, 3, init="random", random_state=5, n_iter_max=15, return_errors=True,
        callback=lambda cp, e: seen_pk.append(e),
    )  # fmt: skip
    want, err_tl = tl_parafac(
        x, 3, init="random", random_state=5, n_iter_max=15, return_errors=True,
        callback=lambda cp, e: seen_tl.append(e),
    )  # fmt: skip
    np.testing.assert_allclose(err_pk, np.asarray(err_tl, dtype=float), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(seen_pk, np.asarray(seen_tl, dtype=float), rtol=1e-9, atol=1e-12)
    assert len(seen_pk) == len(err_pk) + 1  # the initial model, then each iteration
    for f, g in zip(got.factors, want.factors, strict=True):
        np.testing.assert_allclose(f, g, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(got.weights, np.ones(3))


def test_svd_init_errors_match_tensorly_after_the_first_iteration(rng):
    from tensorly.decomposition import parafac as tl_parafac

    x = _noisy_cp(rng, (20, 5, 9), 2)
    _, err_pk = pk.parafac(x, 2, n_iter_max=8, tol=0, return_errors=True)
    _, err_tl = tl_parafac(x, 2, n_iter_max=8, tol=0, return_errors=True)
    np.testing.assert_allclose(err_pk, np.asarray(err_tl, dtype=float), rtol=1e-8)


def test_stopping_rule_and_callback_stop(rng):
    x = _noisy_cp(rng, (15, 4, 6), 2)
    _, errors = pk.parafac(x, 2, init="random", random_state=0, tol=1e-3, return_errors=True)
    decreases = np.abs(np.diff(errors))
    assert decreases[-1] < 1e-3 and np.all(decreases[:-1] >= 1e-3)
    calls = []
    _, errors = pk.parafac(
        x, 2, init="random", random_state=0, tol=0, n_iter_max=50, return_errors=True,
        callback=lambda cp, e: calls.append(e) or len(calls) == 4,
    )  # fmt: skip
    assert len(errors) == 3 and len(calls) == 4


def test_fixed_modes_are_left_exactly(rng):
    x = _noisy_cp(rng, (12, 5, 6), 2)
    init = tl.cp_tensor.CPTensor((None, [rng.standard_normal((n, 2)) for n in x.shape]))
    for fixed in ([0], [1], [0, 1]):
        out = pk.parafac(x, 2, init=init, fixed_modes=fixed, n_iter_max=3)
        for m in fixed:
            np.testing.assert_array_equal(out.factors[m], init.factors[m])
        assert not np.array_equal(out.factors[2], init.factors[2])
    with pytest.warns(UserWarning, match="last mode"):
        pk.parafac(x, 2, init=init, fixed_modes=[2], n_iter_max=1)
    nn = pk.non_negative_parafac_hals(np.abs(x), 2, fixed_modes=[2], n_iter_max=2)
    assert np.all(nn.factors[2] >= 0)


def test_backends_in_and_out(rng):
    torch = pytest.importorskip("torch")
    x = _noisy_cp(rng, (10, 4, 5), 2).astype(np.float32)
    want = pk.parafac(x, 2, init="random", random_state=1, n_iter_max=5)
    assert all(f.dtype == np.float32 for f in want.factors)
    with tl.backend_context("pytorch"):
        got = pk.parafac(tl.tensor(x), 2, init="random", random_state=1, n_iter_max=5)
        assert all(isinstance(f, torch.Tensor) and f.dtype == torch.float32 for f in got.factors)
        assert isinstance(got.weights, torch.Tensor)
    for f, g in zip(got.factors, want.factors, strict=True):
        np.testing.assert_allclose(f.numpy(), g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"orthogonalise": True}, "orthogonalise"),
        ({"linesearch": True}, "linesearch"),
        ({"sparsity": 0.5}, "sparsity"),
        ({"l2_reg": 0.1}, "l2_reg"),
        ({"mask": np.ones((4, 3, 5))}, "mask"),
    ],
)
def test_unsupported_options_are_named(kwargs, name):
    with pytest.raises(NotImplementedError, match=name):
        pk.parafac(np.ones((4, 3, 5)), 1, **kwargs)


def test_unsupported_data_and_hals_options_are_named(rng):
    x = np.abs(rng.standard_normal((4, 3, 5)))
    with pytest.raises(NotImplementedError, match="complex"):
        pk.parafac(x + 1j * x, 1)
    with pytest.raises(NotImplementedError, match="order 2"):
        pk.parafac(x[0], 1)
    with pytest.raises(NotImplementedError, match="sparsity_coefficients"):
        pk.non_negative_parafac_hals(x, 1, sparsity_coefficients=[0.1, None, None])
    with pytest.raises(NotImplementedError, match="nn_modes"):
        pk.non_negative_parafac_hals(x, 1, nn_modes={0})
    with pytest.raises(NotImplementedError, match="exact"):
        pk.non_negative_parafac_hals(x, 1, exact=True)
    with pytest.raises(ValueError, match="not recognized"):
        pk.parafac(x, 1, init="bogus")
    with pytest.raises(TypeError, match="convergence criterion"):
        pk.parafac(x, 1, cvg_criterion="bogus")


def test_classes_fit_and_keep_errors(rng):
    x = _noisy_cp(rng, (10, 4, 5), 2, nonneg=True)
    cp = pk.CP(2, init="random", random_state=0, n_iter_max=10).fit(x)
    assert len(cp.errors_) == 10 or cp.errors_[-1] < 0.05
    nn = pk.CP_NN_HALS(2, n_iter_max=10)
    out = nn.fit_transform(x)
    assert out is nn.decomposition_ and all(np.all(f >= 0) for f in out.factors)
    assert repr(nn) == "Rank-2 Non-Negative CP decomposition."


def test_memmap_is_streamed_not_copied(rng, tmp_path):
    x = _noisy_cp(rng, (30, 4, 5), 2)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    got = pk.parafac(mapped, 2, init="random", random_state=3, n_iter_max=5)
    want = pk.parafac(x, 2, init="random", random_state=3, n_iter_max=5)
    for f, g in zip(got.factors, want.factors, strict=True):
        np.testing.assert_array_equal(f, g)
