"""A fit streamed from an activation store against the same fit on the array in memory.

Captures an N x C x H x W float16 layer (``nn.Identity``, so the stored bytes
are the inputs), then runs ``cp_als`` on ``store[layer]`` and on the array, side
by side, and prints seconds per iteration (medians of iterations 2..). The
store is read from the page cache here (it was just written); the disk case
is ``bench_store.py``'s.

    python benchmarks/bench_store_fit.py [--n 4096 --c 256 --h 14 --w 14 --rank 8]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from _table import finish, per_iteration
from torch import nn

import peekcore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--c", type=int, default=256)
    parser.add_argument("--h", type=int, default=14)
    parser.add_argument("--w", type=int, default=14)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.c, args.h, args.w), dtype=np.float32)
    np.abs(x, out=x)
    x16 = torch.from_numpy(x).half()
    base = Path(tempfile.mkdtemp(prefix="bench_store_fit."))
    try:
        store = peekcore.capture(
            nn.Sequential(nn.Identity()), x16, "0", base / "s.zarr", dtype="float16", progress=False
        )
        layer = store["0"]
        kw = dict(n_iter_max=args.iters, tol=0.0, random_state=0, progress=False)
        res = {"shape": list(layer.shape), "rank": args.rank, "store_chunk": layer.chunk_size}
        for rep in range(2):  # alternate which goes first
            sides = [("store", layer), ("memory", x16.numpy())]
            for name, data in sides if rep == 0 else sides[::-1]:
                fit = peekcore.cp_als(data, args.rank, **kw)
                res.setdefault(name, []).append(per_iteration(fit))
                res[f"{name}_chunk"] = fit.metadata["chunk_size"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    store_s, memory_s = min(res["store"]), min(res["memory"])
    res["store_over_memory"] = store_s / memory_s
    rows = [
        ("case", f"{tuple(layer.shape)} float16, R={args.rank}, {args.iters} iterations"),
        ("fit from the store (page cache)", f"{store_s * 1e3:.1f} ms/iter"),
        ("fit from the array in memory", f"{memory_s * 1e3:.1f} ms/iter"),
        ("store / memory", f"{res['store_over_memory']:.2f}"),
        ("chunks read (samples)", f"store {res['store_chunk']} (stored {layer.chunk_size})"),
    ]
    finish(rows, res, args.json)


if __name__ == "__main__":
    main()
