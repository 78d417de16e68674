"""GPU benchmark, side by side with TensorLy in the same run (issue targets a-d).

    python benchmarks/bench_gpu.py --json OUT.json [--quick]

Cases (float32 unless said; R = 32):
  (c) 10,000 x 256 x 196 on the card: peekcore cuda / torch-reference kernels
      and TensorLy parafac (pytorch backend), TF32 off and on
  (d) ncp_hals on (c) against TensorLy non_negative_parafac_hals
  (a) 50,000 x 1024 x 196 float16 on the card: ms per iteration, peak extra GPU
      memory, the read floor; TensorLy on the float32 tensor (or its OOM)
  (b) the same tensor in pinned host memory: time per iteration over the time
      of copying it to the card once
  kernels: each custom CUDA kernel against the torch expression it replaces
Prints a short table last; every number goes to --json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
import traceback

import numpy as np
import torch
from _table import per_iteration

import peekcore
from peekcore.model import CPModel

DEV = torch.device("cuda")
RESULTS: dict = {}
TABLE: list[tuple[str, str]] = []


def row(name: str, value: str) -> None:
    TABLE.append((name, value))
    print(f"{name}: {value}", flush=True)


def cuda_time(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def eager(fn):
    """``fn()`` with the fit's CUDA-graph replay off (``PEEKCORE_CUDA_GRAPHS=0``)."""
    old = os.environ.get("PEEKCORE_CUDA_GRAPHS")
    os.environ["PEEKCORE_CUDA_GRAPHS"] = "0"
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["PEEKCORE_CUDA_GRAPHS"]
        else:
            os.environ["PEEKCORE_CUDA_GRAPHS"] = old


def random_init(shape, rank, seed=0) -> CPModel:
    rng = np.random.default_rng(seed)
    return CPModel(np.ones(rank), [rng.random((n, rank)) for n in shape])


def tensorly_per_iteration(x, init: CPModel, iters: int, nonneg: bool) -> float:
    import tensorly as tl
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import non_negative_parafac_hals, parafac

    tl.set_backend("pytorch")
    fn = non_negative_parafac_hals if nonneg else parafac

    def run(n):
        cp = CPTensor(
            (
                torch.ones(init.rank, dtype=x.dtype, device=x.device),
                [torch.as_tensor(f, dtype=x.dtype, device=x.device) for f in init.factors],
            )
        )
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x, init.rank, n_iter_max=n, init=cp, tol=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(1)
    long, short = run(iters), run(2)
    tl.set_backend("numpy")
    return (long - short) / (iters - 2)


def case_c_d(args) -> None:
    shape, rank = (10_000, 256, 196), 32
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.rand(shape, generator=g, device=DEV)
    init = random_init(shape, rank)
    kw = dict(n_iter_max=12, tol=0, init=init, device="cuda", progress=False)
    out = {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        tag = "tf32" if tf32 else "fp32"
        out[f"peekcore_cuda_{tag}"] = per_iteration(peekcore.cp_als(x, rank, **kw))
        out[f"peekcore_torchref_{tag}"] = per_iteration(
            peekcore.cp_als(x, rank, kernel="torch", **kw)
        )
        try:
            out[f"tensorly_{tag}"] = tensorly_per_iteration(x, init, 12, nonneg=False)
        except Exception as err:  # noqa: BLE001 - record and go on
            out[f"tensorly_{tag}"] = f"error: {err}"
        out[f"peekcore_cuda_{tag}_eager"] = per_iteration(
            eager(lambda: peekcore.cp_als(x, rank, **kw))
        )
        ours, theirs = out[f"peekcore_cuda_{tag}"], out[f"tensorly_{tag}"]
        row(f"(c) cp_als {tag} peekcore", f"{ours * 1e3:.2f} ms/iter")
        eager_s = out[f"peekcore_cuda_{tag}_eager"]
        row(f"(c) cp_als {tag} without CUDA graphs", f"{eager_s * 1e3:.2f} ms/iter")
        if isinstance(theirs, float):
            row(f"(c) cp_als {tag} TensorLy", f"{theirs * 1e3:.2f} ms/iter")
            row(f"(c) speedup {tag} (>= 4)", f"{theirs / ours:.2f}x")
        row(f"(c) torch-reference kernel {tag}", f"{out[f'peekcore_torchref_{tag}'] * 1e3:.2f} ms")
        # the same CUDA pass with its custom kernels as torch operations (no CuPy)
        from peekcore.kernels.cuda import CudaKernel

        as_torch = CudaKernel(DEV, backend="torch")
        out[f"peekcore_cuda_torchbackend_{tag}"] = per_iteration(
            peekcore.cp_als(x, rank, kernel=as_torch, **kw)
        )
        row(
            f"(c) cuda pass, torch backend {tag}",
            f"{out[f'peekcore_cuda_torchbackend_{tag}'] * 1e3:.2f} ms/iter",
        )
    torch.backends.cuda.matmul.allow_tf32 = False
    hals = per_iteration(peekcore.ncp_hals(x, rank, **kw))
    out["peekcore_cuda_hals_fp32"] = hals
    row("(d) ncp_hals peekcore", f"{hals * 1e3:.2f} ms/iter")
    hals_eager = per_iteration(eager(lambda: peekcore.ncp_hals(x, rank, **kw)))
    out["peekcore_cuda_hals_fp32_eager"] = hals_eager
    row("(d) ncp_hals without CUDA graphs", f"{hals_eager * 1e3:.2f} ms/iter")
    row("(d) ncp_hals / cp_als (<= 1.5)", f"{hals / out['peekcore_cuda_fp32']:.2f}")
    try:
        tl_hals = tensorly_per_iteration(x, init, 6, nonneg=True)
        out["tensorly_hals_fp32"] = tl_hals
        row("(d) TensorLy HALS", f"{tl_hals * 1e3:.1f} ms/iter")
        row("(d) HALS speedup (>= 25)", f"{tl_hals / hals:.1f}x")
    except Exception as err:  # noqa: BLE001
        out["tensorly_hals_fp32"] = f"error: {err}"
    RESULTS["case_c_d"] = out


def case_a_b(args) -> None:
    n = 50_000 if not args.quick else 5_000
    shape, rank = (n, 1024, 196), 32
    out: dict = {"shape": shape}
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.rand(shape, generator=g, device=DEV, dtype=torch.float16)
    nbytes = x.numel() * 2
    copy_t = cuda_time(functools.partial(torch.clone, x), repeats=3, warmup=1)
    out["device_copy_bytes_per_s"] = 2 * nbytes / copy_t
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = peekcore.cp_als(x, rank, n_iter_max=8, tol=0, device="cuda", progress=False)
    out["peekcore_f16_on_card"] = per_iteration(model)
    out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    floor = nbytes / out["device_copy_bytes_per_s"]
    row("(a) read floor (tensor / copy rate)", f"{floor * 1e3:.2f} ms")
    row("(a) cp_als f16 on card (<= 10 ms)", f"{out['peekcore_f16_on_card'] * 1e3:.2f} ms/iter")
    row("(a) peak extra GPU memory (<= 2 GiB)", f"{out['peak_extra_bytes'] / 2**30:.2f} GiB")
    # Larger chunks than the default 1 GiB: fewer GEMMs, longer ones (less
    # split-K in X @ KR, fewer passes over the P temporary of A^T X).
    sample_bytes = 2 * shape[1] * shape[2]
    for gib in (2, 4):
        rows = min(n, (gib << 30) // sample_bytes)
        try:
            m = peekcore.cp_als(
                x, rank, n_iter_max=6, tol=0, device="cuda", chunk_size=rows, progress=False
            )
            out[f"peekcore_f16_on_card_chunk_{gib}gib"] = per_iteration(m)
            row(f"(a) same, {gib} GiB chunks", f"{per_iteration(m) * 1e3:.2f} ms/iter")
        except Exception as err:  # noqa: BLE001 - record and go on
            out[f"peekcore_f16_on_card_chunk_{gib}gib"] = f"error: {err}"
            row(f"(a) same, {gib} GiB chunks", f"error: {str(err).splitlines()[0][:60]}")
        torch.cuda.empty_cache()
    if not args.quick:
        try:
            x32 = x.float()
            out["tensorly_f32_on_card"] = tensorly_per_iteration(
                x32, random_init(shape, rank), 4, nonneg=False
            )
            row("(a) TensorLy f32 on card", f"{out['tensorly_f32_on_card'] * 1e3:.1f} ms/iter")
        except torch.OutOfMemoryError as err:
            out["tensorly_f32_on_card"] = f"OOM: {str(err).splitlines()[0]}"
            row("(a) TensorLy f32 on card", "out of memory")
        finally:
            x32 = None
            torch.cuda.empty_cache()
    # (b) the same tensor in pinned host memory
    host = torch.empty(shape, dtype=torch.float16, pin_memory=True)
    host.copy_(x)
    x = None
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    on_card = host.to(DEV, non_blocking=True)
    torch.cuda.synchronize()
    copy_once = time.perf_counter() - t0
    del on_card
    torch.cuda.empty_cache()
    model = peekcore.cp_als(host, rank, n_iter_max=4, tol=0, device="cuda", progress=False)
    out["host_copy_seconds"] = copy_once
    out["peekcore_f16_pinned"] = per_iteration(model)
    row("(b) copy to card once", f"{copy_once * 1e3:.1f} ms ({nbytes / copy_once / 1e9:.1f} GB/s)")
    row("(b) cp_als f16 pinned host", f"{out['peekcore_f16_pinned'] * 1e3:.1f} ms/iter")
    row("(b) ratio to one copy (<= 1.15)", f"{out['peekcore_f16_pinned'] / copy_once:.2f}")
    RESULTS["case_a_b"] = out


def kernels_vs_torch(args) -> None:
    from peekcore.kernels.cuda import CudaKernel
    from peekcore.kernels.cuda_launch import Launch, pow2_scale
    from peekcore.kernels.reference import hals_rows

    kern = CudaKernel(DEV)
    out = {}
    x = torch.rand((4096, 256 * 196), device=DEV, dtype=torch.float16)
    norm = torch.zeros((), dtype=torch.float64, device=DEV)

    def ours_norm():
        norm.zero_()
        n = x.numel()
        kern.launcher.run(
            Launch("sum_squares", torch.float16, (8192, 1), 256, (x, np.int64(n), norm))
        )

    out["sum_squares"] = (cuda_time(ours_norm), cuda_time(lambda: torch.sum(x.double() ** 2)))
    b = torch.rand((1024, 32), device=DEV, dtype=torch.float64)
    c = torch.rand((196, 32), device=DEV, dtype=torch.float64)
    holder = kern.prepare_factors([b, c], torch.float32)

    def ours_kr():
        holder.kr.clear()
        kern._khatri_rao(holder, torch.float16)

    def torch_kr():
        kr = (b[:, None, :] * c[None, :, :]).reshape(-1, 32)
        s = pow2_scale(kr.abs().amax(0))
        hi = (kr * s).half()
        lo = (kr * s - hi.double()).half()
        return torch.cat([hi, lo], dim=1)

    out["khatri_rao_split"] = (cuda_time(ours_kr), cuda_time(torch_kr))
    m = torch.rand((20000, 64), device=DEV)
    gi = torch.rand((32, 32), device=DEV, dtype=torch.float64)
    a = torch.rand((20000, 32), device=DEV)
    ones = torch.ones(32, dtype=torch.float64, device=DEV)

    def rows_kernel(hals: bool) -> None:
        kern.launcher.update_rows(m, ones, gi, a, (32,), hals=hals, sweeps=5 if hals else 1)

    out["update_rows_als"] = (
        cuda_time(lambda: rows_kernel(False)),
        cuda_time(lambda: a.copy_((m[:, :32] + m[:, 32:]).double() @ gi)),
    )
    out["update_rows_hals"] = (
        cuda_time(lambda: rows_kernel(True)),
        cuda_time(
            lambda: hals_rows(a.double(), (m[:, :32] + m[:, 32:]).double(), gi, 5),
            repeats=3,
            warmup=1,
        ),
    )
    p = torch.rand((64, 256 * 196), device=DEV)
    t = torch.zeros((32, 256 * 196), device=DEV)
    inv = torch.ones(32, device=DEV)
    width = 256 * 196
    out["add_split"] = (
        cuda_time(
            lambda: kern.launcher.run(
                Launch(
                    "add_split",
                    None,
                    (min((width + 255) // 256, 1024), 32),
                    256,
                    (p, inv, np.int32(32), np.int64(width), np.int32(2), t),
                )
            )
        ),
        cuda_time(lambda: t.add_((p[:32] + p[32:]) * inv[:, None])),
    )
    for name, (ours, theirs) in out.items():
        row(
            f"kernel {name}",
            f"{ours * 1e6:.1f} us vs torch {theirs * 1e6:.1f} us ({theirs / ours:.1f}x)",
        )
    RESULTS["kernels_vs_torch"] = out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    args = parser.parse_args()
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["build"] = peekcore.build_info()
    for case in (kernels_vs_torch, case_c_d, case_a_b):
        try:
            case(args)
        except Exception:  # noqa: BLE001 - keep going, report at the end
            RESULTS[case.__name__ + "_error"] = traceback.format_exc()
            row(case.__name__, "FAILED (see JSON)")
            traceback.print_exc()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(RESULTS, fh, indent=2, default=str)
    print("\n== " + RESULTS["device"])
    width = max(len(k) for k, _ in TABLE)
    for k, v in TABLE:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
