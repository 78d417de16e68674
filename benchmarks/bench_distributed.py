"""Data-parallel fits: time per iteration on 1 and 2 CPU processes, same data, same run.

Each process reads its half of the samples; per iteration the processes
all-reduce T (R x C x S) and A^T A (R x R): R * (C * S + R) float32/float64
values. Default 2,000 x 256 x 196 float32, R = 16: 16 x 50,176 floats = 3.2 MB.

    python benchmarks/bench_distributed.py [--json F]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from _table import case_parser, finish

WORKER = textwrap.dedent(
    """
    import json, os, sys, numpy as np, torch, peekcore
    world = int(os.environ["WORLD_SIZE"])
    if world > 1:
        torch.distributed.init_process_group("gloo")
    x = np.load(os.environ["DATA"], mmap_mode="r")
    m = peekcore.cp_als(x, int(os.environ["RANK_R"]), n_iter_max=8, tol=0, progress=False)
    if int(os.environ["RANK"]) == 0:
        print(json.dumps({"seconds": m.history.seconds, "fit": m.fit}))
    if world > 1:
        torch.distributed.destroy_process_group()
    """
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, threads: int, data: Path, rank: int) -> dict:
    port = _port()
    procs = []
    for r in range(world):
        env = dict(
            os.environ,
            RANK=str(r),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DATA=str(data),
            RANK_R=str(rank),
            OMP_NUM_THREADS=str(threads),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed: {[p.returncode for p in procs]}")
    res = json.loads(outs[0].strip().splitlines()[-1])
    res["per_iteration"] = float(np.median(res["seconds"][1:]))
    return res


def main() -> None:
    parser = case_parser(__doc__)
    parser.add_argument("--json")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "x.npy"
        x = np.random.default_rng(0).standard_normal((args.n, args.c, args.s), dtype=np.float32)
        np.save(data, x)
        one = run(1, cores, data, args.rank)
        two = run(2, max(1, cores // 2), data, args.rank)
    values = args.rank * (args.c * args.s + args.rank)
    res = {
        "shape": [args.n, args.c, args.s],
        "rank": args.rank,
        "cores": cores,
        "allreduce_values_per_iteration": values,
        "one_process": one["per_iteration"],
        "two_processes": two["per_iteration"],
        "fit_one": one["fit"],
        "fit_two": two["fit"],
    }

    rows = [
        ("case", f"{tuple(res['shape'])} float32, R={args.rank}, {cores} cores"),
        ("all-reduce per iteration", f"{values:,} values ({values * 4 / 2**20:.1f} MiB)"),
        (f"1 process x {cores} threads", f"{one['per_iteration'] * 1e3:.1f} ms/iter"),
        (
            f"2 processes x {max(1, cores // 2)} threads",
            f"{two['per_iteration'] * 1e3:.1f} ms/iter",
        ),
        ("ratio 2 / 1", f"{two['per_iteration'] / one['per_iteration']:.2f}"),
        ("|fit(2) - fit(1)|", f"{abs(one['fit'] - two['fit']):.2e}"),
    ]
    finish(rows, res, args.json)


if __name__ == "__main__":
    main()
