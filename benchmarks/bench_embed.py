"""The embedding surfaces against TensorLy: the drop-in, memory limits, the C++ library.

1. ``peekcore.tensorly.parafac`` against TensorLy's own ``parafac`` (numpy and
   pytorch backends) on bench_cpu.py's case, end to end: the call's wall time,
   initialization included (TensorLy's default ``init="svd"``), at 10 and 100
   iterations (``tol=0``).
2. Peak memory above the loaded input during a fit (anonymous resident memory,
   sampled every 2 ms in a fresh process) at a few sample counts, a line
   through them, and from it the largest tensor (samples of 256 x 196 float32)
   each can fit in 16 GiB: TensorLy with the tensor in memory, peekcore with
   it in memory and streamed from a ``.npy`` file (only the sample factor
   grows with N there; the data's limit is the disk).
3. The C++ example (``examples/embed``, libpeekcore) against the Python fit:
   seconds per iteration on the same data and initial factors.

    python benchmarks/bench_embed.py [--json out.json] [--n 2000 --rank 16] [--skip ...]
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _cpp_example import ROOT, build_example, run
from _table import case_parser, finish, per_iteration

import peekcore
from peekcore.model import CPModel

GIB = 1 << 30
KINDS = ("tensorly_numpy", "tensorly_pytorch", "peekcore_memory", "peekcore_npy")
BUDGET = 16 * GIB

# Run in a fresh process: load the data, start sampling RssAnon, fit, print the peak.
MEMORY_PROBE = """
import json, re, sys, threading, time
import numpy as np
kind, n, c, s, rank, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
    int(sys.argv[5]), sys.argv[6]
def anon():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
import torch, tensorly as tl
import peekcore, peekcore.tensorly
from tensorly.decomposition import parafac
x = np.load(path, mmap_mode="r") if kind == "peekcore_npy" else np.load(path)
small = np.abs(np.random.default_rng(0).standard_normal((8, c, s), dtype=np.float32))
peekcore.tensorly.parafac(small, 2, n_iter_max=1)  # load every library first
parafac(small, 2, n_iter_max=1)
if kind == "tensorly_pytorch":
    tl.set_backend("pytorch")
    x = tl.tensor(torch.from_numpy(x))
base, peak, done = anon(), [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
if kind.startswith("tensorly"):
    parafac(x, rank, n_iter_max=2, tol=0)
elif kind == "peekcore_npy":
    peekcore.tensorly.parafac(x, rank, n_iter_max=2, tol=0)
else:
    peekcore.tensorly.parafac(np.asarray(x), rank, n_iter_max=2, tol=0)
done[0] = True; t.join()
print(json.dumps({"base": base, "peak": max(peak[0], anon())}))
"""


def make_data(n: int, c: int, s: int, seed: int = 0) -> np.ndarray:
    """|N(0, 1)| float32 data, generated in place (see bench_cpu.py)."""
    x = np.random.default_rng(seed).standard_normal((n, c, s), dtype=np.float32)
    np.abs(x, out=x)
    return x


def end_to_end(x: np.ndarray, rank: int, iters: int, who: str) -> float:
    """Wall seconds of one parafac call, init="svd" (TensorLy's default) included."""
    import tensorly as tl
    import torch

    if who == "peekcore":
        from peekcore.tensorly import parafac

        data = x
    else:
        from tensorly.decomposition import parafac

        tl.set_backend(who.removeprefix("tensorly_"))
        data = tl.tensor(torch.from_numpy(x) if who == "tensorly_pytorch" else x)
    try:
        parafac(data[:50], rank, n_iter_max=1, init="svd", tol=0)  # imports, first calls
        t0 = time.perf_counter()
        parafac(data, rank, n_iter_max=iters, init="svd", tol=0)
        return time.perf_counter() - t0
    finally:
        tl.set_backend("numpy")


def memory_line(kind: str, sizes: list[int], c: int, s: int, rank: int, tmp: Path) -> dict:
    """Peak anonymous memory above the loaded input at each N, and the fitted line."""
    peaks = []
    for n in sizes:
        path = tmp / f"x_{n}.npy"
        if not path.exists():
            np.save(path, make_data(n, c, s))
        out = run(
            [sys.executable, "-c", MEMORY_PROBE, kind, str(n), str(c), str(s), str(rank), str(path)]
        )
        info = json.loads(out.strip().splitlines()[-1])
        peaks.append(info["peak"] - info["base"])
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(peaks, float), 1)
    per_sample = c * s * 4
    in_memory = kind != "peekcore_npy"  # the tensor itself counts against the budget
    cost = max(slope, 0.0) + (per_sample if in_memory else 0)
    largest = int((BUDGET - max(intercept, 0.0)) / cost) if cost > 0 else None
    return {
        "sizes": sizes,
        "peak_above_input_bytes": peaks,
        "bytes_per_sample": slope,
        "fixed_bytes": intercept,
        "largest_n_in_16gib": largest,
        "largest_tensor_gib": largest * per_sample / GIB if largest else None,
    }


def cpp_against_python(x: np.ndarray, rank: int, iters: int, tmp: Path) -> dict:
    """Seconds per iteration of the C++ example and of peekcore.cp_als, same data and init."""
    program = build_example(ROOT / "build" / "bench-embed", tmp / "prefix", tmp / "example")
    rng = np.random.default_rng(1)
    init = [rng.random((n, rank)) for n in x.shape]
    np.save(tmp / "x.npy", x)
    paths = []
    for m, f in enumerate(init):
        paths.append(str(tmp / f"init_{m}.npy"))
        np.save(paths[-1], f)
    out = run(
        [str(program), str(tmp / "x.npy"), str(rank), "--iters", str(iters), "--tol", "0"]
        + ["--init", *paths, "--out", str(tmp)]
    )
    cpp_seconds = np.load(tmp / "seconds.npy")
    model = peekcore.cp_als(
        x, rank, init=CPModel(np.ones(rank), init), n_iter_max=iters, tol=0, progress=False
    )
    fit_cpp = float(re.search(r"fit ([0-9.]+)", out).group(1))
    return {
        "cpp_seconds_per_iteration": float(np.median(cpp_seconds[1:])),
        "python_seconds_per_iteration": per_iteration(model),
        "fit_cpp": fit_cpp,
        "fit_python": model.fit,
    }


def main() -> None:
    parser = case_parser(__doc__)
    parser.add_argument("--iters", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument(
        "--who", nargs="+", default=["peekcore", "tensorly_numpy", "tensorly_pytorch"]
    )
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    parser.add_argument("--skip", nargs="*", default=[], choices=["e2e", "memory", "cpp"])
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args()

    res: dict = {"case": {"shape": (args.n, args.c, args.s), "rank": args.rank}}
    res["build"] = peekcore.build_info()
    rows: list[tuple[str, str]] = []

    def add(name: str, value: str) -> None:  # printed as it comes: runs take minutes
        rows.append((name, value))
        print(f"{name}: {value}", flush=True)

    add("case", f"({args.n}, {args.c}, {args.s}) float32, R={args.rank}")
    x = make_data(args.n, args.c, args.s)
    if "e2e" not in args.skip:
        e2e: dict = {}
        for iters in args.iters:
            for who in args.who:
                e2e[f"{who}_{iters}"] = end_to_end(x, args.rank, iters, who)
                add(f"{who}, {iters} iterations (s)", f"{e2e[f'{who}_{iters}']:8.2f}")
        res["end_to_end_seconds"] = e2e
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "memory" not in args.skip:
            mem = {}
            for kind in args.kinds:
                mem[kind] = line = memory_line(
                    kind, args.memory_sizes, args.c, args.s, args.rank, tmp
                )
                add(
                    f"{kind}: bytes/sample above input, largest N in 16 GiB",
                    f"{line['bytes_per_sample']:.0f}, {line['largest_n_in_16gib']}",
                )
            res["memory"] = mem
        if "cpp" not in args.skip:
            res["cpp"] = cpp = cpp_against_python(x, args.rank, min(args.iters), tmp)
            rows.append(("C++ example ms/iter", f"{cpp['cpp_seconds_per_iteration'] * 1e3:.1f}"))
            rows.append(
                ("Python cp_als ms/iter", f"{cpp['python_seconds_per_iteration'] * 1e3:.1f}")
            )
    finish(rows, res, args.json)


if __name__ == "__main__":
    main()
