"""The rank measures' refit-free bootstrap against a bootstrap that refits every sweep.

``peekcore.profile.measures.bootstrap_measures`` resamples the samples with the
fitted models held fixed. This script measures what that leaves out: on
planted nonnegative rank-3 tensors (60 x 12 x 10, one class per component,
Gaussian noise at each ``--noise`` level relative to the signal's RMS), one
rank sweep (ranks 1-6, 3 replicates) is measured, then

- ``--n-boot`` refit-free draws (one residual pass, then per-draw arithmetic);
- ``--n-refit`` draws that resample the rows and run the whole sweep again.

For each measure it prints the mean and standard deviation of both, and the
time each takes.

    python benchmarks/bench_profile_bootstrap.py [--noise 0.1 0.35] [--n-boot 200]
        [--n-refit 25] [--json PATH]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from _table import finish

import peekcore
from peekcore.profile.measures import MEASURES, bootstrap_measures, measure_sweep

SWEEP = dict(replicates=3, n_iter_max=60, tol=1e-9, random_state=3, progress=False)
RANKS = range(1, 7)


def _planted(noise: float, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """60 x 12 x 10 rank-3 data whose component r loads on class r, and the labels."""
    rng = np.random.default_rng(seed)
    n, rank = 60, 3
    labels = np.arange(n) % rank
    a = 0.3 * np.abs(rng.normal(size=(n, rank)))
    a[np.arange(n), labels] += 1.0
    factors = [a] + [np.abs(rng.normal(size=(m, rank))) + 0.1 for m in (12, 10)]
    x = np.einsum("ir,jr,kr->ijk", *factors)
    x = x + noise * np.linalg.norm(x) / np.sqrt(x.size) * rng.normal(size=x.shape)
    return x, labels


def _one(noise: float, n_boot: int, n_refit: int) -> dict:
    x, labels = _planted(noise)
    sweep = peekcore.rank_sweep(x, RANKS, **SWEEP)
    point = measure_sweep(sweep, labels=labels)
    t = time.perf_counter()
    fixed = bootstrap_measures(sweep, x, labels=labels, n_boot=n_boot, random_state=0)
    t_fixed = time.perf_counter() - t
    refit = {m: [] for m in MEASURES}
    rng = np.random.default_rng(1)
    t = time.perf_counter()
    with warnings.catch_warnings():
        # resamples repeat rows: core consistency warnings at high ranks are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(n_refit):
            idx = rng.integers(0, x.shape[0], x.shape[0])
            redone = peekcore.rank_sweep(x[idx], RANKS, **SWEEP)
            for name, value in measure_sweep(redone, labels=labels[idx]).items():
                refit[name].append(value)
    t_refit = time.perf_counter() - t
    out = {"noise": noise, "point": point, "seconds_fixed": t_fixed, "seconds_refit": t_refit}
    for name in MEASURES:
        f, r = fixed[name], np.asarray(refit[name])
        out[name] = {
            "fixed_mean": float(np.nanmean(f)),
            "fixed_sd": float(np.nanstd(f)),
            "refit_mean": float(np.nanmean(r)),
            "refit_sd": float(np.nanstd(r)),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.35])
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--n-refit", type=int, default=25)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results, rows = [], []
    for noise in args.noise:
        res = _one(noise, args.n_boot, args.n_refit)
        results.append(res)
        rows.append(
            (
                f"noise {noise:g}: time",
                f"fixed {res['seconds_fixed']:.2f} s ({args.n_boot} draws), refit "
                f"{res['seconds_refit']:.1f} s ({args.n_refit} draws)",
            )
        )
        for name in MEASURES:
            r = res[name]
            rows.append(
                (
                    f"noise {noise:g}: {name} (point {res['point'][name]:.3g})",
                    f"fixed {r['fixed_mean']:.3f} +- {r['fixed_sd']:.4f}, "
                    f"refit {r['refit_mean']:.3f} +- {r['refit_sd']:.4f}",
                )
            )
    finish(rows, {"runs": results, "n_boot": args.n_boot, "n_refit": args.n_refit}, args.json)


if __name__ == "__main__":
    main()
