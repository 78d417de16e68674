"""Side-by-side CPU benchmark: peekcore against TensorLy on the same data and init.

Prints seconds per iteration, ratios, the fraction of the machine's measured
matrix-multiply rate, and peak memory, then a short table last. Default case:
2,000 x 256 x 196 float32, R = 16, 10 iterations.

    python benchmarks/bench_cpu.py [--json results.json] [--n 2000 --c 256 --s 196 --rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from _table import case_parser, finish, per_iteration

import peekcore
from peekcore.model import CPModel


def matmul_rate(n: int = 4096, repeats: int = 5) -> float:
    """Best float32 GEMM rate (FLOP/s) of torch and numpy on this machine."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    an, bn = a.numpy(), b.numpy()
    for _ in range(repeats):
        t0 = time.perf_counter()
        an @ bn
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def read_rate(x: np.ndarray, repeats: int = 3) -> float:
    """Bytes per second of summing an array (a memory-read ceiling)."""
    best = 0.0
    t = torch.from_numpy(x)
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(t.sum())
        best = max(best, x.nbytes / (time.perf_counter() - t0))
    return best


def time_tensorly(x: np.ndarray, init, rank: int, iters: int, backend: str, nonneg: bool) -> float:
    """TensorLy seconds per iteration: (time(iters) - time(2)) / (iters - 2)."""
    import tensorly as tl
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import non_negative_parafac_hals, parafac

    tl.set_backend(backend)
    data = tl.tensor(torch.from_numpy(x) if backend == "pytorch" else x)
    w, fs = init
    cp = CPTensor((tl.tensor(w.astype(x.dtype)), [tl.tensor(f.astype(x.dtype)) for f in fs]))
    fn = non_negative_parafac_hals if nonneg else parafac

    def run(n: int) -> float:
        t0 = time.perf_counter()
        fn(data, rank, n_iter_max=n, init=cp.cp_copy() if hasattr(cp, "cp_copy") else cp, tol=0)
        return time.perf_counter() - t0

    run(1)  # warm up
    t_long, t_short = run(iters), run(2)
    tl.set_backend("numpy")
    return (t_long - t_short) / (iters - 2)


def peak_overhead(args: argparse.Namespace) -> dict:
    """Peak resident memory above the loaded input during a fit, in a fresh process.

    The kernel's high-water mark (VmHWM) is reset after the input is loaded
    (``/proc/self/clear_refs``), so the peak counts the fit alone.
    """
    code = f"""
import json, re, numpy as np, peekcore
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
rng = np.random.default_rng(0)
x = rng.standard_normal(({args.n}, {args.c}, {args.s}), dtype=np.float32)
np.abs(x, out=x)
peekcore.cp_als(x[:8], 2, n_iter_max=1, progress=False)  # load every library first
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
m = peekcore.cp_als(x, {args.rank}, n_iter_max=3, tol=0, progress=False)
peak = status("VmHWM")
print(json.dumps({{"base_kib": base, "peak_kib": peak, "chunk": m.metadata["chunk_size"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    per_sample = args.c * args.s * 4
    over = (info["peak_kib"] - info["base_kib"]) * 1024
    bound = 2 * info["chunk"] * per_sample + 4 * args.rank * args.c * args.s * 4 * os.cpu_count()
    return {"overhead_bytes": over, "bound_bytes": bound, "input_bytes": args.n * per_sample}


def main() -> None:
    parser = case_parser(__doc__)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", help="write all numbers here")
    parser.add_argument("--skip-tensorly", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.n, args.c, args.s)
    # nonnegative data so the same tensor serves ALS and HALS
    x = rng.standard_normal(shape, dtype=np.float32)
    np.abs(x, out=x)  # in place: see activation_like in peekcore/cli.py
    x16 = x.astype(np.float16)
    init = (np.ones(args.rank), [rng.random((n, args.rank)) for n in shape])
    init_model = CPModel(*init)
    flops = 4 * np.prod(shape) * args.rank
    res: dict = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "case": {"shape": shape, "rank": args.rank, "iters": args.iters},
        "build": peekcore.build_info(),
    }
    res["matmul_flops"] = matmul_rate()
    res["read_bytes_per_s"] = read_rate(x)
    kw = dict(n_iter_max=args.iters, tol=0, init=init_model, progress=False)
    times = {}
    times["peekcore_native_f32"] = per_iteration(peekcore.cp_als(x, args.rank, **kw))
    times["peekcore_native_f16"] = per_iteration(peekcore.cp_als(x16, args.rank, **kw))
    times["peekcore_torch_f32"] = per_iteration(peekcore.cp_als(x, args.rank, kernel="torch", **kw))
    times["peekcore_native_hals_f32"] = per_iteration(peekcore.ncp_hals(x, args.rank, **kw))
    if not args.skip_tensorly:
        for backend in ("pytorch", "numpy"):
            for nonneg, tag in ((False, "als"), (True, "hals")):
                times[f"tensorly_{backend}_{tag}"] = time_tensorly(
                    x, init, args.rank, args.iters, backend, nonneg=nonneg
                )
    res["seconds_per_iteration"] = times
    res["memory"] = peak_overhead(args)

    ours = times["peekcore_native_f32"]
    frac = flops / ours / res["matmul_flops"]
    rows = [("case", f"{shape} float32, R={args.rank}, {args.iters} iterations")]
    rows.append(("matmul rate (measured)", f"{res['matmul_flops'] / 1e9:.1f} GFLOP/s"))
    rows.append(("memory read (measured)", f"{res['read_bytes_per_s'] / 1e9:.1f} GB/s"))
    for name, t in times.items():
        rows.append((name, f"{t * 1e3:8.1f} ms/iter"))
    if not args.skip_tensorly:
        best_tl = min(times["tensorly_pytorch_als"], times["tensorly_numpy_als"])
        res["speedup_vs_tensorly"] = best_tl / ours
        rows.append(("speedup vs TensorLy best (>= 3)", f"{best_tl / ours:.2f}x"))
        best_tl_hals = min(times["tensorly_pytorch_hals"], times["tensorly_numpy_hals"])
        hals = times["peekcore_native_hals_f32"]
        res["hals_speedup_vs_tensorly"] = best_tl_hals / hals
        rows.append(("HALS speedup vs TensorLy HALS (>= 3)", f"{best_tl_hals / hals:.2f}x"))
    res["hals_over_als"] = times["peekcore_native_hals_f32"] / ours
    rows.append(("ncp_hals / cp_als time (<= 1.5)", f"{res['hals_over_als']:.2f}"))
    res["matmul_fraction"] = frac
    res["f16_over_f32"] = times["peekcore_native_f16"] / ours
    rows.append(("fraction of matmul rate (> 0.5)", f"{frac:.2f}"))
    rows.append(("float16 / float32 time (<= 1.1)", f"{res['f16_over_f32']:.2f}"))
    mem = res["memory"]
    rows.append(
        (
            "peak memory above input",
            f"{mem['overhead_bytes'] / 2**20:.0f} MiB (bound {mem['bound_bytes'] / 2**20:.0f} MiB,"
            f" input {mem['input_bytes'] / 2**20:.0f} MiB)",
        )
    )
    finish(rows, res, args.json)


if __name__ == "__main__":
    main()
