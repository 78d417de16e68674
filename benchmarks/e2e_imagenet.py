"""ImageNet scale end to end on one device: capture a layer to a store, sweep, refine, report.

The path a user runs, timed stage by stage (issue 20):

1. a ResNet-50 with random weights (see ``_resnet.py``) over N synthetic,
   seeded images generated on the device (standard-normal pixels, as after
   ImageNet normalization);
2. ``layer3`` captured to an activation store in float16, folded to
   ``N x 1024 x (H*W)`` (``50,000 x 1024 x 196`` at 224 x 224), against the
   same model's forward pass alone up to ``layer3`` over the same batches
   (target: capture at >= 80% of its images per second);
3. the store's write (the capture, made durable by one ``syncfs``) and cold
   read throughput against the same bytes written and read as one plain file
   on the same disk;
4. a compressed CP rank sweep from the store (ranks 1-32 by default) with exact
   refinement of the chosen rank, its time and the peak device memory;
5. the HTML report of the sweep (``peek report``).

Runs on the CPU at a small size as a check (``make test`` runs
``--n 256 --size 64 --ranks 1-6``) and on a GPU at full size::

    python benchmarks/e2e_imagenet.py --device cuda --n 50000 --size 224 --out /tmp/e2e
    python benchmarks/e2e_imagenet.py --device cpu --n 512 --size 64 --ranks 1-8 --out /tmp/e2e

The input images are one tensor on the device (50,000 x 3 x 224 x 224 in
float16 is 15 GB; in float32 on the CPU at the small size, 25 MB): on a GPU
they count toward the peak memory reported for the capture. Prints a short
table last and writes every number to ``--json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from _resnet import resnet50
from _table import finish
from bench_store import evict, sync_disk

import peekcore
from peekcore.cli import parse_ranks

CAPTURE_TARGET = 0.8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def synthetic_images(n: int, size: int, device: torch.device, seed: int) -> torch.Tensor:
    """``n x 3 x size x size`` standard-normal images made on ``device``, seeded, in slabs."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = torch.empty((n, 3, size, size), dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for i in range(0, n, 4096):  # bounded float32 scratch
        j = min(n, i + 4096)
        out[i:j] = torch.randn((j - i, 3, size, size), generator=gen, device=device)
    return out


def forward_alone(model, images: torch.Tensor, batch: int, autocast: bool) -> float:
    """Seconds for the model's own forward up to ``layer3`` over ``images`` in batches."""
    trunk = torch.nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3
    )
    device = images.device
    ctx = torch.autocast(device.type, dtype=torch.float16) if autocast else nullcontext()
    with torch.inference_mode(), ctx:
        trunk(images[:batch])  # warm-up: cuDNN's algorithm choice, allocator
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            trunk(images[i : i + batch])
        _sync(device)
    return time.perf_counter() - t0


def _raw_file_io(folder: Path, nbytes: int) -> tuple[float, float]:
    """Seconds to write ``nbytes`` as one file (to disk, synced) and to read it back cold."""
    path = folder / "raw.bin"
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, block.nbytes)
            f.write(block[:n].data)
            left -= n
    sync_disk(folder)
    t_write = time.perf_counter() - t0
    evict(path)
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    t_read = time.perf_counter() - t0
    path.unlink()
    return t_write, t_read


def _store_read(layer, store_path: Path) -> float:
    """Seconds to read every stored chunk of ``layer`` from disk (page cache dropped first)."""
    evict(store_path)
    t0 = time.perf_counter()
    for chunk in layer.chunks(None):
        np.asarray(chunk).sum(dtype=np.float32)  # touch every byte of the mapping
    return time.perf_counter() - t0


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=50000, help="images")
    p.add_argument("--size", type=int, default=224, help="image height and width")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ranks", default="1-32")
    p.add_argument("--replicates", type=int, default=2)
    p.add_argument("--iters", type=int, default=50, help="n_iter_max of the compressed sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="e2e-out", help="folder for the store, sweep and report")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    return p.parse_args()


def main() -> dict:
    args = _arguments()
    device = torch.device(args.device)
    ranks = parse_ranks(args.ranks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_path = out / "acts.zarr"
    autocast = device.type == "cuda"
    res: dict = {"n": args.n, "size": args.size, "device": str(device), "ranks": ranks}
    if device.type == "cuda":
        res["card"] = torch.cuda.get_device_name(device)

    model, res["model"] = resnet50(args.seed)
    model = model.to(device).eval()
    t0 = time.perf_counter()
    images = synthetic_images(args.n, args.size, device, args.seed)
    _sync(device)
    res["generate_s"] = time.perf_counter() - t0

    res["forward_s"] = forward_alone(model, images, args.batch, autocast)
    _peak_reset(device)
    t0 = time.perf_counter()
    store = peekcore.capture(
        model,
        images,
        layers="layer3",
        store=store_path,
        dtype="float16",
        batch_size=args.batch,
        autocast=autocast,
        fold_spatial=True,
        overwrite=True,
        progress=False,
    )
    _sync(device)
    t_capture = time.perf_counter() - t0
    sync_disk(out)
    res["capture_s"] = t_capture
    res["capture_synced_s"] = time.perf_counter() - t0
    res["capture_peak_gib"] = _peak_gib(device)
    layer = store["layer3"]
    res["layer_shape"] = list(layer.shape)
    nbytes = int(np.prod(layer.shape)) * 2
    res["store_bytes"] = nbytes
    res["forward_img_per_s"] = args.n / res["forward_s"]
    res["capture_img_per_s"] = args.n / t_capture
    res["capture_vs_forward"] = res["capture_img_per_s"] / res["forward_img_per_s"]
    del images
    if device.type == "cuda":
        torch.cuda.empty_cache()

    res["store_read_s"] = _store_read(layer, store_path)
    res["raw_write_s"], res["raw_read_s"] = _raw_file_io(out, nbytes)
    gb = nbytes / 1e9
    res["store_write_gb_s"] = gb / res["capture_synced_s"]
    res["store_read_gb_s"] = gb / res["store_read_s"]
    res["raw_write_gb_s"] = gb / res["raw_write_s"]
    res["raw_read_gb_s"] = gb / res["raw_read_s"]

    _peak_reset(device)
    t0 = time.perf_counter()
    sweep = peekcore.rank_sweep(
        layer,
        ranks,
        args.replicates,
        method="cp",
        compress=True,
        n_iter_max=args.iters,
        tol=1e-6,
        random_state=args.seed,
        device=device,
        progress=False,
    )
    _sync(device)
    res["sweep_s"] = time.perf_counter() - t0
    res["sweep_peak_gib"] = _peak_gib(device)
    res["chosen_rank"] = sweep.chosen_rank
    res["refined_fit"] = float(sweep.model().fit)
    res["compression"] = sweep.compression
    sweep_path = out / "sweep.npz"
    sweep.save(sweep_path)

    from peekcore.cli import main as peek

    t0 = time.perf_counter()
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet):  # peek prints its JSON answer
        code = peek(["--json", "report", str(sweep_path), "--out", str(out / "report.html")])
    res["report_s"] = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"peek report failed with exit code {code}")
    res["report"] = str(out / "report.html")
    if not args.keep:
        shutil.rmtree(store_path)

    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    peak = res["sweep_peak_gib"]
    rows = [
        ("case", f"{args.n} x 3 x {args.size}^2 -> layer3 {tuple(layer.shape)} fp16, {device}"),
        ("model", res["model"]),
        (
            "capture vs forward alone",
            f"{res['capture_img_per_s']:.0f} vs {res['forward_img_per_s']:.0f} img/s = "
            f"{pct(res['capture_vs_forward'])} (target >= {pct(CAPTURE_TARGET)})",
        ),
        (
            "capture to disk (synced) vs raw write",
            f"{res['store_write_gb_s']:.2f} vs {res['raw_write_gb_s']:.2f} GB/s",
        ),
        (
            "store read (cold) vs raw read",
            f"{res['store_read_gb_s']:.2f} vs {res['raw_read_gb_s']:.2f} GB/s",
        ),
        (
            "compressed sweep + refinement",
            f"ranks {ranks[0]}-{ranks[-1]} x {args.replicates}: {res['sweep_s']:.1f} s, chosen "
            f"rank {res['chosen_rank']}, refined fit {res['refined_fit']:.4f}",
        ),
        ("peak device memory", "n/a (CPU)" if peak is None else f"sweep {peak:.1f} GiB"),
        ("report", f"{res['report_s']:.1f} s -> {res['report']}"),
    ]
    finish(rows, res, args.json)
    return res


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(0 if main() else 1)
