"""The ``peek`` command line.

``peek demo``  fits a CP model to a generated activation-shaped tensor and
               prints fit, iterations and time.
``peek info``  prints what was compiled in (``peekcore.build_info()``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import numpy as np

__all__ = ["main"]


def activation_like(
    n: int, channels: int, space: int, rank: int, seed: int, noise: float = 0.1
) -> np.ndarray:
    """A nonnegative, low-rank-plus-noise tensor shaped like ReLU activations (float32)."""
    rng = np.random.default_rng(seed)
    a = rng.gamma(1.0, 1.0, (n, rank))
    b = rng.random((channels, rank)) ** 3
    c = rng.random((space, rank)) ** 2
    x = np.einsum("ir,jr,kr->ijk", a, b, c, optimize=True).astype(np.float32)
    x += noise * x.std() * rng.standard_normal(x.shape, dtype=np.float32)
    np.maximum(x, 0, out=x)
    # A fresh copy: on this project's VMs, reading an array whose pages were first
    # written by ufuncs ran up to 7x slower than reading a memcpy'd one (measured with
    # torch and with peekcore alike, 2026-11-26; cause not established).
    return x.copy()


def _demo(args: argparse.Namespace) -> dict:
    import peekcore

    x = activation_like(args.samples, args.channels, args.space, args.true_rank, args.seed)
    print(
        f"peekcore demo: a generated activation-shaped tensor {x.shape} ({x.dtype}, "
        f"{x.nbytes / 2**20:.0f} MiB) of rank {args.true_rank} plus 10% noise; "
        f"CP-ALS with rank {args.rank}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    model = peekcore.cp_als(
        x, args.rank, n_iter_max=args.iters, tol=1e-6, random_state=args.seed, progress=None
    )
    total = time.perf_counter() - t0
    per_iter = float(np.median(model.history.seconds))
    return {
        "shape": list(x.shape),
        "rank": args.rank,
        "fit": model.fit,
        "iterations": model.history.n_iter,
        "converged": model.history.converged,
        "seconds": total,
        "seconds_per_iteration": per_iter,
        "kernel": model.metadata["kernel"],
    }


def _info(args: argparse.Namespace) -> dict:
    import peekcore

    return peekcore.build_info()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peek", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit a generated activation-shaped tensor")
    demo.add_argument("--samples", type=int, default=2000, help="sample-mode size (default 2000)")
    demo.add_argument("--channels", type=int, default=256, help="channels (default 256)")
    demo.add_argument("--space", type=int, default=196, help="spatial positions (default 196)")
    demo.add_argument("--true-rank", type=int, default=8, help="planted rank (default 8)")
    demo.add_argument("--rank", type=int, default=8, help="fitted rank (default 8)")
    demo.add_argument("--iters", type=int, default=50, help="maximum iterations (default 50)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="what was compiled in")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except Exception as err:  # one clear line; the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"peek {args.command}: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for key, value in result.items():
            if isinstance(value, float):
                value = f"{value:.6g}"
            print(f"{key:>22}: {value}")
    return 0
