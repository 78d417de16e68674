"""The streaming fit loop shared by ``cp_als`` and ``ncp_hals``.

One iteration = one pass over the data (``PassKernel.pass_chunk`` on every
chunk) followed by the resident updates from the pass statistics. The first
pass also measures ``||X||^2`` (and checks every chunk for NaN/Inf).
"""

from __future__ import annotations

import json
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write
from .._version import __version__
from ..kernels import ALS, HALS, PassKernel, get_kernel
from ..model import CPModel, FitHistory, normalize_factors
from ..sources import ChunkSource, as_source, dtype_name
from .resident import als_solve, gram_inverse, hadamard, resident_mttkrp

__all__ = ["IterationInfo", "FitSettings", "fit_streaming", "TORCH_DTYPES"]

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
DEFAULT_MAX_CHUNK_BYTES = 64 << 20  # CPU: a chunk is a unit of reading, blocks do the work
DEVICE_RESIDENT_CHUNK_BYTES = 1 << 30  # data already on the GPU: few, large GEMMs
DEVICE_STREAMED_CHUNK_BYTES = 256 << 20  # host -> GPU: double-buffered copies of this size


@dataclass(frozen=True)
class IterationInfo:
    """What a ``callback`` receives after each iteration."""

    iteration: int
    fit: float
    rel_error: float
    seconds: float


@dataclass
class FitSettings:
    """Validated arguments of one fit."""

    rank: int
    method: str
    n_iter_max: int
    tol: float
    init: Any
    random_state: int | None
    chunk_size: int
    compute_dtype: torch.dtype
    sweeps: int
    checkpoint: Path | None
    checkpoint_every: int


# ---------------------------------------------------------------- validation


def check_rank(rank: Any, shape: tuple[int, ...]) -> int:
    """A positive integer rank that the data can support."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if rank > shape[0]:
        raise ValueError(
            f"rank {rank} exceeds the number of samples ({shape[0]}): the sample factor would "
            "be underdetermined; choose rank <= the number of samples"
        )
    return rank


def check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) < 3:
        raise ValueError(
            f"peekcore factors tensors with a sample mode and at least two other modes "
            f"(order >= 3); got shape {shape} (order {len(shape)}). A matrix has no unique "
            "CP decomposition (that is PCA / NMF): keep channels and space (or tokens) as "
            "separate modes, e.g. N x C x (H*W)."
        )
    if shape[0] == 0:
        raise ValueError(f"the sample mode is empty (shape {shape}): there is nothing to fit")
    if any(n == 0 for n in shape[1:]):
        raise ValueError(f"shape {shape} has an empty mode: there is nothing to fit")
    return shape


def chunk_size_for(
    shape: tuple[int, ...],
    stored: str,
    chunk_size: int | None,
    max_chunk_bytes: int | None,
    default_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        return int(chunk_size)
    per_sample = math.prod(shape[1:]) * torch.empty((), dtype=TORCH_DTYPES[stored]).element_size()
    budget = default_bytes if max_chunk_bytes is None else int(max_chunk_bytes)
    return max(1, min(shape[0], budget // per_sample))


def _as_tensor(chunk: Any) -> torch.Tensor:
    if isinstance(chunk, torch.Tensor):
        return chunk.detach()
    arr = np.asarray(chunk)
    with warnings.catch_warnings():
        # memory-mapped and read-only arrays: the kernels never write to chunks
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def iterate_chunks(source: ChunkSource, chunk_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Chunks of a source as tensors with their first sample index, shape-checked."""
    shape = tuple(source.shape)
    offset = 0
    for chunk in source.chunks(chunk_size):
        x = _as_tensor(chunk)
        if tuple(x.shape[1:]) != shape[1:] or x.ndim != len(shape):
            raise ValueError(
                f"the chunk at samples {offset}..{offset + (x.shape[0] if x.ndim else 0)} has "
                f"shape {tuple(x.shape)}, but the source's shape {shape} says each chunk is "
                f"(b, {', '.join(map(str, shape[1:]))}); a chunk source must keep every "
                "non-sample dimension fixed"
            )
        if x.dtype.is_floating_point is False:
            raise TypeError(f"the chunk at sample {offset} has non-float dtype {x.dtype}")
        b = x.shape[0]
        if b == 0:
            continue
        if offset + b > shape[0]:
            raise ValueError(
                f"the source yielded more than the {shape[0]} samples its shape declares"
            )
        yield offset, x
        offset += b
    if offset != shape[0]:
        raise ValueError(
            f"the source yielded {offset} samples in a pass but its shape declares {shape[0]}"
        )


def _default_chunk_bytes(source: ChunkSource, kern: PassKernel) -> int:
    if kern.device.type != "cuda":
        return DEFAULT_MAX_CHUNK_BYTES
    on_device = str(getattr(source, "device", "cpu")).startswith("cuda")
    return DEVICE_RESIDENT_CHUNK_BYTES if on_device else DEVICE_STREAMED_CHUNK_BYTES


def pass_chunks(
    source: ChunkSource, chunk_size: int, kern: PassKernel
) -> Iterator[tuple[int, torch.Tensor]]:
    """The chunks of one pass, staged onto the kernel's GPU when it has one."""
    chunks = iterate_chunks(source, chunk_size)
    if kern.device.type == "cuda":
        from ..staging import stage_to_device

        return stage_to_device(chunks, kern.device)
    return chunks


# ---------------------------------------------------------------- init


def gram_pass(
    source: ChunkSource,
    chunk_size: int,
    compute_dtype: torch.dtype,
    device: torch.device,
    nonneg: bool = False,
) -> tuple[list[torch.Tensor], float]:
    """One streamed pass: every resident mode's Gram ``X_(m) X_(m)^T``, and ``||X||^2``."""
    shape = tuple(source.shape)
    d = len(shape) - 1
    grams = [torch.zeros((n, n), dtype=torch.float64, device=device) for n in shape[1:]]
    norm2 = 0.0
    for offset, chunk in iterate_chunks(source, chunk_size):
        x = chunk.to(device=device, dtype=compute_dtype)
        sq = float(torch.sum(x.to(torch.float64) ** 2))
        _check_finite(sq, offset, x.shape[0])
        if nonneg:
            check_nonnegative(x, offset)
        norm2 += sq
        for m in range(d):
            others = [k for k in range(d + 1) if k != m + 1]
            grams[m] += torch.tensordot(x, x, dims=(others, others)).to(torch.float64)
    return grams, norm2


def check_nonnegative(x: torch.Tensor, offset: int) -> None:
    """Refuse negative data for a nonnegative fit, naming the first offending samples."""
    mins = torch.amin(x.reshape(x.shape[0], -1), dim=1)
    bad = torch.nonzero(mins < 0)
    if bad.numel():
        first = offset + int(bad[0, 0])
        last = offset + int(bad[-1, 0])
        raise ValueError(
            f"ncp_hals needs nonnegative data, but samples {first}..{last} of the chunk at "
            f"{offset}..{offset + x.shape[0] - 1} hold negative values (smallest "
            f"{float(mins.min()):.4g}); use cp_als for signed data, or factor nonnegative "
            "activations (e.g. after a ReLU)"
        )


def _check_finite(norm2: float, offset: int, rows: int) -> None:
    if not math.isfinite(norm2):
        raise ValueError(
            f"the data holds NaN or Inf in samples {offset}..{offset + rows - 1}: clean or drop "
            "those samples (e.g. np.nan_to_num) before fitting"
        )


def initial_factors(
    init: Any,
    source: ChunkSource,
    settings: FitSettings,
    device: torch.device,
) -> tuple[torch.Tensor, list[torch.Tensor], float | None]:
    """Initial sample factor (``N x R``), resident factors (float64), ``||X||^2`` if measured."""
    shape = tuple(source.shape)
    rank = settings.rank
    nonneg = settings.method == HALS
    rng = np.random.default_rng(settings.random_state)
    if isinstance(init, str) and init == "random":
        # signed data: Gaussian columns (well spread); nonnegative fits: uniform [0, 1)
        draw = rng.random if nonneg else rng.standard_normal
        mats = [draw((n, rank)) for n in shape]
        return _to_device(mats, device) + (None,)
    if isinstance(init, str) and init == "gram":
        grams, norm2 = gram_pass(
            source, settings.chunk_size, settings.compute_dtype, device, nonneg
        )
        resident = []
        for g, n in zip(grams, shape[1:], strict=True):
            vals, vecs = torch.linalg.eigh(g)
            lead = vecs[:, torch.argsort(vals, descending=True)][:, :rank]
            if lead.shape[1] < rank:  # rank above this mode's dimension: pad at random
                extra = torch.as_tensor(rng.random((n, rank - lead.shape[1])), device=device)
                lead = torch.cat([lead, extra / math.sqrt(n)], dim=1)
            signs = torch.sign(lead.sum(dim=0))
            lead = lead * torch.where(signs == 0, 1.0, signs)
            if nonneg:
                lead = torch.clamp(lead, min=0) + 1e-3 / math.sqrt(n)
            resident.append(lead.contiguous())
        a = torch.zeros((shape[0], rank), dtype=torch.float64, device=device)
        return a, resident, norm2
    if isinstance(init, CPModel) or _is_cp_tensor(init):
        model = init if isinstance(init, CPModel) else CPModel.from_tensorly(init)
        if model.shape != shape or model.rank != rank:
            raise ValueError(
                f"the initial model has shape {model.shape} and rank {model.rank}; the data has "
                f"shape {shape} and rank {rank} was asked"
            )
        mats = [f * model.weights if i == 0 else f for i, f in enumerate(model.factors)]
        if nonneg and any(np.any(m < 0) for m in mats):
            raise ValueError("a nonnegative fit needs a nonnegative initial model")
        return _to_device(mats, device) + (None,)
    raise ValueError(
        f"init must be 'random', 'gram', a CPModel or a TensorLy CPTensor; got {init!r}"
    )


def _is_cp_tensor(obj: Any) -> bool:
    return type(obj).__name__ == "CPTensor" or (
        isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], (list, tuple))
    )


def _to_device(mats: list[np.ndarray], device: torch.device) -> tuple:
    ts = [torch.as_tensor(np.asarray(m, dtype=np.float64), device=device) for m in mats]
    return ts[0].contiguous(), [t.contiguous() for t in ts[1:]]


# ---------------------------------------------------------------- checkpoints


def _settings_key(shape: tuple[int, ...], settings: FitSettings) -> dict:
    return {
        "shape": list(shape),
        "rank": settings.rank,
        "method": settings.method,
        "sweeps": settings.sweeps,
        "compute_dtype": str(settings.compute_dtype).removeprefix("torch."),
    }


def save_checkpoint(
    path: Path,
    shape: tuple[int, ...],
    settings: FitSettings,
    a: torch.Tensor,
    resident: list[torch.Tensor],
    norm2: float,
    history: FitHistory,
) -> None:
    """Write the fit state after a whole iteration, atomically."""
    arrays = {"a": a.detach().cpu().numpy()}
    for i, f in enumerate(resident):
        arrays[f"resident_{i}"] = f.detach().cpu().numpy()
    header = {
        "format": "peekcore.checkpoint",
        "key": _settings_key(shape, settings),
        "norm2": norm2,
        "history": asdict(history),
        "version": __version__,
    }
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_checkpoint(
    path: Path, shape: tuple[int, ...], settings: FitSettings, device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor], float, FitHistory]:
    """Read a checkpoint, refusing one written for other data or settings."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            a = torch.as_tensor(data["a"], device=device)
            resident = [
                torch.as_tensor(data[f"resident_{i}"], device=device) for i in range(len(shape) - 1)
            ]
    except (KeyError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable peekcore checkpoint ({err})") from err
    want = _settings_key(shape, settings)
    if header.get("format") != "peekcore.checkpoint" or header.get("key") != want:
        raise ValueError(
            f"the checkpoint {path} was written for {header.get('key')}, but this fit is {want}; "
            "resume with the same data and settings, or start afresh without resume="
        )
    return a, resident, float(header["norm2"]), FitHistory(**header["history"])


# ---------------------------------------------------------------- dead components


def reseed_dead(
    a: torch.Tensor,
    resident: list[torch.Tensor],
    grams: list[torch.Tensor],
    iteration: int,
    settings: FitSettings,
    history: FitHistory,
) -> None:
    """Give components that HALS drove to zero a fresh nonnegative start (in place).

    A column of a factor that is entirely zero makes its component dead: HALS
    cannot move it again (its Gram diagonal is zero). Such a column is replaced
    by a uniform random one, scaled to the mean norm of the factor's live
    columns, drawn from a generator seeded by (random_state, iteration, mode) so
    that resumed fits repeat it. Each event is recorded in ``history.reseeds``.
    """
    seed = settings.random_state if settings.random_state is not None else 0
    factors = [(0, a, torch.sum(a.to(torch.float64) ** 2, dim=0))]
    factors += [(m + 1, f, torch.diagonal(grams[m])) for m, f in enumerate(resident)]
    for mode, f, diag in factors:
        dead = torch.nonzero(diag <= 0).flatten().tolist()
        if not dead:
            continue
        rng = np.random.default_rng([seed, iteration, mode])
        live = diag > 0
        scale = float(torch.sqrt(diag[live]).mean()) if bool(live.any()) else 1.0
        for r in dead:
            u = torch.as_tensor(rng.random(f.shape[0]), dtype=f.dtype, device=f.device)
            f[:, r] = u * (scale / max(float(torch.linalg.norm(u)), 1e-300))
            history.reseeds.append({"iteration": iteration + 1, "mode": mode, "component": r})
        if mode > 0:
            grams[mode - 1] = f.T @ f


# ---------------------------------------------------------------- the loop


def fit_streaming(
    data: Any,
    rank: Any,
    *,
    method: str,
    n_iter_max: int,
    tol: float,
    init: Any,
    random_state: int | None,
    chunk_size: int | None,
    max_chunk_bytes: int | None,
    dtype: Any,
    device: str | torch.device,
    kernel: str | PassKernel | None,
    callback: Callable[[IterationInfo], Any] | None,
    progress: bool | None,
    sweeps: int = 1,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: str | Path | None = None,
) -> CPModel:
    """Fit a CP model by streaming passes (the body of ``cp_als`` / ``ncp_hals``)."""
    source = as_source(data)
    shape = check_shape(tuple(int(n) for n in source.shape))
    stored = dtype_name(source.dtype)
    rank = check_rank(rank, shape)
    if isinstance(n_iter_max, bool) or not isinstance(n_iter_max, numbers.Integral):
        raise TypeError(f"n_iter_max must be an integer, got {n_iter_max!r}")
    if n_iter_max < 1:
        raise ValueError(f"n_iter_max must be at least 1, got {n_iter_max}")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ValueError(f"tol must be a nonnegative number, got {tol!r}")
    if dtype is None:
        compute = torch.float64 if stored == "float64" else torch.float32
    else:
        compute = TORCH_DTYPES[dtype_name(dtype)]
        if compute not in (torch.float32, torch.float64):
            raise ValueError(
                f"dtype sets the accumulation precision and must be float32 or float64, got "
                f"{dtype}; half-precision storage is fine, accumulation in half is not"
            )
    if sweeps < 1:
        raise ValueError(f"sweeps must be at least 1, got {sweeps}")
    dev = torch.device(device)
    kern = get_kernel(kernel, dev)
    settings = FitSettings(
        rank=rank,
        method=method,
        n_iter_max=int(n_iter_max),
        tol=float(tol),
        init=init,
        random_state=random_state,
        chunk_size=chunk_size_for(
            shape, stored, chunk_size, max_chunk_bytes, _default_chunk_bytes(source, kern)
        ),
        compute_dtype=compute,
        sweeps=int(sweeps) if method == HALS else 0,
        checkpoint=Path(checkpoint) if checkpoint is not None else None,
        checkpoint_every=max(1, int(checkpoint_every)),
    )
    dims = shape[1:]
    width = math.prod(dims)

    t_init = time.perf_counter()
    if resume is not None:
        a64, resident, norm2, history = load_checkpoint(Path(resume), shape, settings, dev)
        norm2_known: float | None = norm2
    else:
        a64, resident, norm2_known = initial_factors(init, source, settings, dev)
        history = FitHistory()
        history.init_seconds = time.perf_counter() - t_init
    a = a64.to(compute).contiguous()
    del a64
    grams = [f.T @ f for f in resident]

    from tqdm.auto import tqdm

    start_iter = history.n_iter
    bar = tqdm(
        total=settings.n_iter_max,
        initial=start_iter,
        desc="ncp_hals" if method == HALS else "cp_als",
        unit="it",
        disable=None if progress is None else not progress,
        leave=False,
    )
    norm2 = norm2_known
    dead_seen = False
    try:
        for it in range(start_iter, settings.n_iter_max):
            t0 = time.perf_counter()
            if method == HALS and (it == start_iter or dead_seen):
                reseed_dead(a, resident, grams, it, settings, history)
            g_full = hadamard(grams)
            g = gram_inverse(g_full) if method == ALS else g_full
            factors = kern.prepare_factors(resident, compute)
            stats = kern.new_statistics(rank, width, compute)
            want_norm = norm2 is None
            first_pass = it == 0 or want_norm
            total = 0.0
            for offset, chunk in pass_chunks(source, settings.chunk_size, kern):
                if first_pass and method == HALS:
                    check_nonnegative(chunk, offset)
                rows = a[offset : offset + chunk.shape[0]]
                n2 = kern.pass_chunk(
                    chunk.reshape(chunk.shape[0], width),
                    factors,
                    g,
                    rows,
                    stats,
                    dims=dims,
                    update=method,
                    sweeps=settings.sweeps,
                    want_norm=want_norm,
                )
                if want_norm:
                    n2 = float(n2)
                    _check_finite(n2, offset, chunk.shape[0])
                    total += n2
            if want_norm:
                norm2 = total
                if norm2 == 0.0:
                    raise ValueError("the data is all zeros: there is nothing to factor")
            t = stats.t.to(torch.float64).reshape((rank, *dims))
            ata = stats.ata
            new_grams = [None] * len(resident)
            for m in range(len(resident)):
                gm = hadamard([ata] + [grams[k] for k in range(len(resident)) if k != m])
                mt = resident_mttkrp(t, resident, m)
                if method == ALS:
                    resident[m] = als_solve(mt, gm).contiguous()
                else:
                    resident[m] = kern.hals_update(
                        resident[m], mt, gm, settings.sweeps
                    ).contiguous()
                grams[m] = resident[m].T @ resident[m]
                new_grams[m] = grams[m]
            inner = torch.sum(mt * resident[-1])
            model2 = torch.sum(hadamard([ata, *grams]))
            # the one host transfer of the iteration: the residual, and whether a
            # component died (zero column: zero Gram diagonal)
            dead = torch.zeros((), dtype=torch.float64, device=inner.device)
            if method == HALS:
                for gram in (ata, *grams):
                    dead = dead + torch.sum(torch.diagonal(gram) <= 0)
            resid2, dead_count = torch.stack([norm2 - 2 * inner + model2, dead]).tolist()
            dead_seen = dead_count > 0
            if not math.isfinite(resid2):
                raise FloatingPointError(
                    f"the fit became non-finite at iteration {it + 1}: the data changed between "
                    "passes or holds NaN/Inf (checked in the first pass only), or the model "
                    "overflowed the compute dtype (try dtype='float64')"
                )
            rel = math.sqrt(max(resid2, 0.0) / norm2)
            seconds = time.perf_counter() - t0
            history.fit.append(1.0 - rel)
            history.rel_error.append(rel)
            history.seconds.append(seconds)
            history.inner_sweeps.append(settings.sweeps)
            bar.update(1)
            bar.set_postfix(fit=f"{1.0 - rel:.6f}")
            if settings.checkpoint is not None and (it + 1) % settings.checkpoint_every == 0:
                save_checkpoint(settings.checkpoint, shape, settings, a, resident, norm2, history)
            if callback is not None and callback(
                IterationInfo(iteration=it + 1, fit=1.0 - rel, rel_error=rel, seconds=seconds)
            ):
                history.stop_reason = "callback"
                break
            if len(history.fit) >= 2:
                prev = history.fit[-2]
                if abs(history.fit[-1] - prev) <= settings.tol * max(abs(prev), 1e-12):
                    history.converged = True
                    history.stop_reason = "tol"
                    break
        else:
            history.stop_reason = "n_iter_max"
    finally:
        bar.close()

    mats = [a.to(torch.float64).cpu().numpy()] + [f.cpu().numpy() for f in resident]
    weights, factors = normalize_factors(mats)
    metadata = {
        "shape": list(shape),
        "rank": rank,
        "method": method,
        "dtype": stored,
        "compute_dtype": str(compute).removeprefix("torch."),
        "random_state": random_state,
        "init": init if isinstance(init, str) else type(init).__name__,
        "chunk_size": settings.chunk_size,
        "kernel": kern.name,
        "device": str(dev),
        "tol": settings.tol,
        "n_iter_max": settings.n_iter_max,
        "sweeps": settings.sweeps,
        "peekcore_version": __version__,
        "torch_version": torch.__version__,
    }
    return CPModel(weights, factors, history, metadata)
