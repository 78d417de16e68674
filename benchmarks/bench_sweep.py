"""Rank sweep benchmark: shared passes against one-by-one fits, and the compressed sweep.

Side by side in one run (default: 2,000 x 256 x 196 float32, ranks 1..16,
3 replicates, 20 iterations, tol 0 so every model runs every iteration):

- exact shared-pass sweep vs the same 48 models fitted one after another
  (target: >= 1.25x faster on a CPU, >= 4x on a GPU);
- compressed sweep (Gram pass, projection pass, the sweep on the projected
  tensor, every model scored exactly on the full data from those passes, and
  the refinement of the chosen rank by exact passes) vs one exact rank-16 fit
  of 20 iterations (target: <= 3x), and the refined model's fit against the
  exact sweep's model of that rank (target: within 0.005).

Each path first runs once, small and untimed, so that one-time costs (CUDA
context, kernel compiles, library handles) fall on neither side.

    python benchmarks/bench_sweep.py [--device cuda --dtype float16 --n 10000] [--json F]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from _table import finish, per_iteration

import peekcore
from peekcore.sweep import rank_sweep


def case_arguments(parser: argparse.ArgumentParser, iters: int) -> None:
    """The sweep case's options (shared with profile_sweep.py)."""
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--c", type=int, default=256)
    parser.add_argument("--s", type=int, default=196)
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")


def case_data(args: argparse.Namespace) -> torch.Tensor:
    """A planted rank-8 nonnegative tensor plus 10% noise (like ReLU activations)."""
    rng = np.random.default_rng(0)
    shape = (args.n, args.c, args.s)
    true = 8
    a, b, c = (
        rng.gamma(1.0, 1.0, (args.n, true)),
        rng.random((args.c, true)) ** 3,
        rng.random((args.s, true)) ** 2,
    )
    x = np.einsum("ir,jr,kr->ijk", a, b, c, optimize=True).astype(np.float32)
    x += 0.1 * x.std() * rng.standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(x.copy()).to(getattr(torch, args.dtype)).to(args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    case_arguments(parser, iters=20)
    parser.add_argument("--skip-sequential", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()

    shape = (args.n, args.c, args.s)
    data = case_data(args)
    ranks = list(range(1, args.max_rank + 1))
    kw = dict(n_iter_max=args.iters, tol=0.0, device=args.device, progress=False)
    res: dict = {"shape": shape, "ranks": ranks, "replicates": args.replicates, **vars(args)}

    # Warm up every code path timed below (two ranks, two iterations): the first
    # call in a process pays one-time costs that neither side should carry:
    # CUDA context and library handles, NVRTC compiles, OpenMP and allocator pools.
    t0 = time.perf_counter()
    warm = dict(kw, n_iter_max=2)
    rank_sweep(data, ranks[:2], 1, **warm)
    peekcore.cp_als(data, ranks[-1], **warm)
    rank_sweep(data, ranks[:2], 1, compress=True, **warm)
    res["warm_up_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    exact = rank_sweep(data, ranks, args.replicates, **kw)
    res["shared_seconds"] = time.perf_counter() - t0
    # the part of the sweep that is iterations (every model logs the shared iteration time)
    res["shared_iteration_seconds"] = per_iteration(exact.models[0][0])
    if args.device.startswith("cuda"):  # the same sweep with its iterations run eagerly
        os.environ["PEEKCORE_CUDA_GRAPHS"] = "0"
        try:
            t0 = time.perf_counter()
            eager = rank_sweep(data, ranks, args.replicates, **kw)
            res["shared_seconds_no_graphs"] = time.perf_counter() - t0
            res["shared_iteration_seconds_no_graphs"] = per_iteration(eager.models[0][0])
        finally:
            del os.environ["PEEKCORE_CUDA_GRAPHS"]
    if not args.skip_sequential:
        t0 = time.perf_counter()
        for r in ranks:
            for p in range(args.replicates):
                peekcore.cp_als(data, r, random_state=p, **kw)
        res["sequential_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = peekcore.cp_als(data, args.max_rank, **kw)
    res["one_fit_seconds"] = time.perf_counter() - t0
    res["one_fit_iteration_seconds"] = per_iteration(one)
    t0 = time.perf_counter()
    small = rank_sweep(data, ranks, args.replicates, compress=True, **kw)
    res["compressed_seconds"] = time.perf_counter() - t0
    r = small.chosen_rank
    res["chosen_exact"] = exact.chosen_rank
    res["chosen_compressed"] = r
    res["fit_gap"] = abs(small.model(r).fit - exact.model(r).fit)
    res["compression"] = small.compression

    rows = [
        (
            "case",
            f"{shape} {args.dtype} on {args.device}, ranks 1..{args.max_rank} x "
            f"{args.replicates}, {args.iters} iterations",
        )
    ]
    rows.append(("warm-up (not timed below)", f"{res['warm_up_seconds']:.2f} s"))
    rows.append(
        (
            "exact shared-pass sweep",
            f"{res['shared_seconds']:.2f} s "
            f"({res['shared_iteration_seconds'] * 1e3:.1f} ms per iteration)",
        )
    )
    if "shared_seconds_no_graphs" in res:
        rows.append(
            (
                "the same without CUDA graphs",
                f"{res['shared_seconds_no_graphs']:.2f} s "
                f"({res['shared_iteration_seconds_no_graphs'] * 1e3:.1f} ms per iteration)",
            )
        )
    if "sequential_seconds" in res:
        rows.append(("the same models one by one", f"{res['sequential_seconds']:.2f} s"))
        speedup = res["sequential_seconds"] / res["shared_seconds"]
        res["shared_speedup"] = speedup
        rows.append(("shared-pass speedup (CPU >= 1.25, GPU >= 4)", f"{speedup:.2f}x"))
    rows.append(
        (
            f"one exact rank-{args.max_rank} fit",
            f"{res['one_fit_seconds']:.2f} s "
            f"({res['one_fit_iteration_seconds'] * 1e3:.1f} ms per iteration)",
        )
    )
    rows.append(("compressed sweep + refinement", f"{res['compressed_seconds']:.2f} s"))
    ratio = res["compressed_seconds"] / res["one_fit_seconds"]
    res["compressed_over_one_fit"] = ratio
    rows.append(("compressed / one fit (<= 3)", f"{ratio:.2f}"))
    rows.append(("chosen rank exact / compressed", f"{exact.chosen_rank} / {r}"))
    rows.append((f"fit gap at rank {r} (<= 0.005)", f"{res['fit_gap']:.5f}"))
    finish(rows, res, args.json)


if __name__ == "__main__":
    main()
