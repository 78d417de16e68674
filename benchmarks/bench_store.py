"""Activation store throughput against raw numpy files on the same disk, in one run.

Capture write: ``peekcore.capture`` of an ``nn.Identity`` layer, so the stored
bytes are exactly the inputs cast to ``--dtype``; timed until every file is on
disk (``syncfs`` of the file system, the same call on both sides), against
``np.save`` of the same bytes. The inputs are in the stored dtype by default
(the layer outputs what is stored, as under autocast or on a GPU);
``--input-dtype float32`` makes capture also convert float32 outputs on the
CPU, work the raw side does not do.

Store read: iterating ``store[layer].chunks()`` against ``np.load`` of the raw
file, both after their files were dropped from the page cache
(``posix_fadvise(DONTNEED)`` on those files only), so both read the disk;
once with the store's default ``read_mode="auto"`` (buffered for a layer this
size) and once with ``read_mode="direct"`` (``O_DIRECT``, what ``"auto"``
picks for a layer larger than half the available memory).

The same two comparisons in the page cache (no sync, no eviction) are shown
for information. Repeats alternate which side goes first; the table shows the
best of the repeats (and the ratio of the medians), the JSON every time.

    python benchmarks/bench_store.py [--n 8192 --c 256 --h 14 --w 14] [--dtype float16]
                                     [--repeats 5] [--dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import peekcore
from peekcore.store import to_storage

TARGET = 0.8


def sync_disk(path: Path) -> None:
    """Write every dirty page of the file system holding ``path`` to disk (``syncfs``).

    One call makes a whole store durable, as one ``fsync`` does a single file, so
    the two sides are timed alike (a per-file fsync would charge the store one
    journal commit per chunk file). Falls back to ``os.sync``.
    """
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    """Drop the pages of the files under ``path`` from the page cache (after a sync)."""
    sync_disk(path if path.is_dir() else path.parent)
    paths = [path] if path.is_file() else [Path(r) / f for r, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192, help="samples")
    parser.add_argument("--c", type=int, default=256, help="channels")
    parser.add_argument("--h", type=int, default=14)
    parser.add_argument("--w", type=int, default=14)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument(
        "--input-dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="dtype of the layer's output (default: --dtype)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: capture's")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", help="folder on the disk to test (default: a temporary one)")
    parser.add_argument("--json", help="write all numbers here")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((args.n, args.c, args.h, args.w), dtype=np.float32)
    input_dtype = args.input_dtype or args.dtype
    x = torch.from_numpy(x32).to(getattr(torch, input_dtype))
    del x32
    stored = x.to(getattr(torch, args.dtype))
    raw = to_storage(stored)  # the exact bytes the store holds
    nbytes = raw.nbytes
    model = nn.Sequential(nn.Identity())

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_store."))
    base.mkdir(parents=True, exist_ok=True)
    raw_path, store_path = base / "raw.npy", base / "acts.zarr"

    def raw_write(sync: bool) -> float:
        remove(raw_path)
        sync_disk(base)  # start from a clean disk cache: only this write gets flushed

        def run() -> None:
            with open(raw_path, "wb") as fh:
                np.save(fh, raw)
            if sync:
                sync_disk(base)

        return timed(run)

    def store_write(sync: bool) -> float:
        remove(store_path)
        sync_disk(base)

        def run() -> None:
            peekcore.capture(
                model,
                x,
                "0",
                store_path,
                dtype=args.dtype,
                batch_size=args.batch_size,
                chunk_size=args.chunk_size,
                progress=False,
            )
            if sync:
                sync_disk(base)

        return timed(run)

    def raw_read(cold: bool) -> float:
        if cold:
            evict(raw_path)
        return timed(lambda: np.load(raw_path))

    def store_read(cold: bool, mode: str = "auto") -> float:
        if cold:
            evict(store_path)

        def run() -> None:
            for _chunk in peekcore.ActivationStore(store_path, read_mode=mode)["0"].chunks():
                pass

        return timed(run)

    def store_read_direct(cold: bool) -> float:
        return store_read(cold, "direct")

    cases = {
        "capture write, disk": (raw_write, store_write, True),
        "store read, disk": (raw_read, store_read, True),
        "store read direct, disk": (raw_read, store_read_direct, True),
        "capture write, page cache": (raw_write, store_write, False),
        "store read, page cache": (raw_read, store_read, False),
    }
    seconds: dict[str, dict[str, list[float]]] = {k: {"raw": [], "store": []} for k in cases}
    try:
        store_write(False)  # warm up: imports, allocator, first files
        for rep in range(args.repeats):
            for name, (raw_fn, store_fn, flag) in cases.items():
                order = [("raw", raw_fn), ("store", store_fn)]
                if rep % 2:
                    order.reverse()
                for side, fn in order:
                    seconds[name][side].append(fn(flag))
        check = peekcore.ActivationStore(store_path)
        assert np.array_equal(to_storage(torch.as_tensor(check["0"].read())), raw)
        chunk_size = check.chunk_size
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    rows = []
    for name, sides in seconds.items():
        raw_best, store_best = nbytes / min(sides["raw"]), nbytes / min(sides["store"])
        raw_med = nbytes / statistics.median(sides["raw"])
        store_med = nbytes / statistics.median(sides["store"])
        rows.append(
            {
                "case": name,
                "raw_gb_s": raw_best / 1e9,
                "store_gb_s": store_best / 1e9,
                "ratio": store_best / raw_best,
                "raw_gb_s_median": raw_med / 1e9,
                "store_gb_s_median": store_med / 1e9,
                "ratio_median": store_med / raw_med,
                "raw_seconds": sides["raw"],
                "store_seconds": sides["store"],
            }
        )
    res = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "disk": str(base),
        "shape": [args.n, args.c, args.h, args.w],
        "dtype": args.dtype,
        "input_dtype": input_dtype,
        "bytes": nbytes,
        "chunk_size": chunk_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "versions": peekcore.build_info() | {"zarr": __import__("zarr").__version__},
        "target_ratio": TARGET,
        "results": rows,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, default=str)

    print(
        f"\n{args.n} x {args.c} x {args.h} x {args.w} {args.dtype} = {nbytes / 2**20:.0f} MiB "
        f"(layer output {input_dtype}), chunks of {chunk_size} samples, {args.repeats} "
        f"repeats, disk {base}"
    )
    print(f"{'case':<28}{'raw numpy':>11}{'store':>11}{'store/raw':>11}{'(median)':>10}")
    for row in rows:
        note = ""
        if row["case"].endswith("disk"):
            note = "  ok" if row["ratio"] >= TARGET else f"  below {TARGET:.0%}"
        print(
            f"{row['case']:<28}{row['raw_gb_s']:>6.2f} GB/s{row['store_gb_s']:>6.2f} GB/s"
            f"{row['ratio']:>10.0%}{row['ratio_median']:>10.0%}{note}"
        )
    print("GB/s: best of the repeats; (median): the ratio of the medians")


if __name__ == "__main__":
    main()
