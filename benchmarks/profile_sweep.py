"""Where a shared-pass rank sweep spends its iterations: torch.profiler tables.

On an H200 the GPU shared sweep measured 2.06x faster than fitting its 48
models one by one (target 4x), at 82 ms per iteration if all of its 1.65 s
had been iterations, while its arithmetic (R = 408 stacked columns) takes a
few milliseconds. That run had no warm-up, so it also timed CUDA start-up and
kernel compiles. This script separates the two: after a warm-up it runs a few
iterations of the ``bench_sweep.py`` sweep under the profiler and prints the
operators by self device time and by host time, and the wall time per
iteration with and without the profiler.

    python benchmarks/profile_sweep.py [--device cuda --dtype float16 --n 10000] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_sweep import case_arguments, case_data

from peekcore.sweep import rank_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    case_arguments(parser, iters=3)
    parser.add_argument("--out", help="folder for the tables and a Chrome trace")
    args = parser.parse_args()

    data = case_data(args)
    ranks = list(range(1, args.max_rank + 1))
    kw = dict(n_iter_max=args.iters, tol=0.0, device=args.device, progress=False)
    cuda = args.device.startswith("cuda")

    def run() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rank_sweep(data, ranks, args.replicates, **kw)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.iters

    run()  # warm up: kernels compiled and loaded, allocator filled
    plain = run()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        profiled = run()
    events = prof.key_averages()
    tables = []
    if cuda:
        tables.append(
            ("self device time", events.table(sort_by="self_cuda_time_total", row_limit=25))
        )
    tables.append(("host time", events.table(sort_by="cpu_time_total", row_limit=25)))
    head = (
        f"sweep of {len(ranks) * args.replicates} models (R = "
        f"{args.replicates * sum(ranks)} stacked), {tuple(data.shape)} {args.dtype} on "
        f"{args.device}: {plain * 1e3:.1f} ms per iteration ({profiled * 1e3:.1f} profiled)"
    )
    text = head + "\n\n" + "\n\n".join(f"by {name}:\n{t}" for name, t in tables)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile_sweep.txt").write_text(text)
        prof.export_chrome_trace(str(out / "profile_sweep_trace.json"))
    print(text)


if __name__ == "__main__":
    main()
