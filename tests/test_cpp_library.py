"""libpeekcore, the C++ library: built, installed, linked by examples/embed, and equal to Python.

The library is configured and built in ``build/cpp-tests`` (kept between runs,
so later runs only relink what changed), installed into a temporary prefix,
and the example project is built against it with ``find_package(peekcore)``;
``ctest`` runs the example. The example's fit from given initial factors
equals ``peekcore.cp_als`` / ``ncp_hals`` from the same factors to 1e-10 in
float64.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from reference import low_rank

import peekcore
from benchmarks._cpp_example import build_example, cmake_tool
from benchmarks._cpp_example import run as _run
from peekcore.model import CPModel

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cpp-tests"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The built example program, linked against an installed libpeekcore."""
    if cmake_tool() is None:
        pytest.skip("cmake is not installed")
    prefix = tmp_path_factory.mktemp("prefix")
    ex = tmp_path_factory.mktemp("example")
    program = build_example(BUILD, prefix, ex)
    out = _run([cmake_tool("ctest") or "ctest", "--test-dir", str(ex), "--output-on-failure"])
    assert "100% tests passed" in out
    return program


def _fit_cpp(example: Path, tmp: Path, x: np.ndarray, init: list[np.ndarray], extra: list[str]):
    np.save(tmp / "x.npy", x)
    paths = []
    for m, f in enumerate(init):
        paths.append(str(tmp / f"init_{m}.npy"))
        np.save(paths[-1], np.ascontiguousarray(f, dtype=np.float64))
    rank = init[0].shape[1]
    out = _run(
        [str(example), str(tmp / "x.npy"), str(rank), "--init", *paths, "--out", str(tmp), *extra],
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    weights = np.load(tmp / "weights.npy")
    factors = [np.load(tmp / f"factor_{m}.npy") for m in range(x.ndim)]
    return out, weights, factors, np.load(tmp / "fit.npy")


@pytest.mark.parametrize(
    "shape,nonneg", [((40, 5, 6), False), ((40, 5, 6), True), ((30, 9, 8, 9), False)]
)
def test_cpp_fit_equals_python(example, tmp_path, rng, shape, nonneg):
    x, _ = low_rank(rng, shape, 3, noise=0.1)
    x = np.abs(x) if nonneg else x
    init = [rng.random((n, 3)) + 0.05 for n in shape]
    args = ["--iters", "12", "--tol", "0"] + (["--nonneg"] if nonneg else [])
    out, weights, factors, fit = _fit_cpp(example, tmp_path, x, init, args)
    fit_py = peekcore.ncp_hals if nonneg else peekcore.cp_als
    model = fit_py(x, 3, init=CPModel(np.ones(3), init), n_iter_max=12, tol=0, kernel="native")
    np.testing.assert_allclose(fit, model.history.fit, rtol=0, atol=1e-10)
    np.testing.assert_allclose(weights, model.weights, rtol=1e-10)
    for got, want in zip(factors, model.factors, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    printed = float(re.search(r"fit ([0-9.]+)", out).group(1))
    assert printed == pytest.approx(model.fit, abs=1e-6)


def test_cpp_reads_float32_and_refuses_bad_input(example, tmp_path, rng):
    x, _ = low_rank(rng, (50, 6, 7), 2, noise=0.01)
    np.save(tmp_path / "x32.npy", x.astype(np.float32))
    out = _run([str(example), str(tmp_path / "x32.npy"), "2"])
    assert float(re.search(r"fit ([0-9.]+)", out).group(1)) > 0.98
    np.save(tmp_path / "neg.npy", x)
    done = subprocess.run(
        [str(example), str(tmp_path / "neg.npy"), "2", "--nonneg"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "nonnegative data" in done.stderr
    np.save(tmp_path / "mat.npy", x[:, :, 0])
    done = subprocess.run(
        [str(example), str(tmp_path / "mat.npy"), "2"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "d >= 2" in done.stderr
