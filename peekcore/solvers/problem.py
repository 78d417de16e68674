"""What a fit works on: the problem (source, kernel, settings, process shard),
the state of each model being fitted, and the chunk policy.

``prepare`` checks a fit's arguments once and returns a :class:`Problem`;
:func:`plan_chunks` is the one place that decides how many samples a pass
reads at a time; :class:`ModelState` is one model between passes (what the
loop in ``engine`` iterates and ``checkpoint`` saves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._validate import check_device, check_int, check_output_file
from ..distributed import Communicator, ShardSource, communicator
from ..kernels import HALS, PassKernel, get_kernel
from ..model import FitHistory
from ..sources import ChunkSource, as_source, describe_source, dtype_name, natural_chunk_size
from .checks import (
    TORCH_DTYPES,
    check_checkpoint_every,
    check_fixed_modes,
    check_iterations,
    check_shape,
    compute_dtype_for,
)
from .init import Initializer
from .passes import on_device
from .scaling import ScaledSource, choose_scale, unscaled

__all__ = [
    "DEFAULT_MAX_CHUNK_BYTES",
    "DEVICE_RESIDENT_CHUNK_BYTES",
    "DEVICE_STREAMED_CHUNK_BYTES",
    "NATURAL_CHUNK_ALONE_BYTES",
    "ModelState",
    "Problem",
    "RunSettings",
    "new_state",
    "plan_chunks",
    "prepare",
    "samples_per_chunk",
]

DEFAULT_MAX_CHUNK_BYTES = 64 << 20  # CPU: a chunk is a unit of reading, blocks do the work
DEVICE_RESIDENT_CHUNK_BYTES = 1 << 30  # data already on the GPU: few, large GEMMs
DEVICE_STREAMED_CHUNK_BYTES = 256 << 20  # host -> GPU: double-buffered copies of this size
# CPU, default budget: a source's own chunk (a store's stored chunk) of at least this size
# is read alone, not grouped up to the budget. A store hands those out as mappings of its
# files, without a copy; a 4,096 x 256 x 14 x 14 float16 fit from a store went 129-149 ->
# 96-99 ms per iteration (benchmarks/bench_store_fit.py), and passes over 128 samples
# instead of 668 cost the same fit in memory at most 10 ms.
NATURAL_CHUNK_ALONE_BYTES = 4 << 20


@dataclass
class RunSettings:
    """Validated solver settings shared by every model of a run."""

    method: str
    n_iter_max: int
    tol: float
    chunk_size: int
    compute_dtype: torch.dtype
    sweeps: int
    checkpoint: Path | None = None
    checkpoint_every: int = 1
    # modes whose factors stay at their initial values (0 the sample mode)
    fixed_modes: tuple[int, ...] = ()


@dataclass
class ModelState:
    """One model while it is being fitted.

    Attributes
    ----------
    rank, seed : int
    a : torch.Tensor
        ``N x R`` sample factor in the compute dtype, on the kernel's device.
    resident : list of torch.Tensor
        ``I_m x R`` float64 resident factors.
    history : FitHistory
    active : bool
        Still iterating.
    statistics : tuple, optional
        ``(T, AtA)`` of the model's last pass (``R x I_1 x ... x I_d`` and
        ``R x R``, float64), in the scale of ``a`` and ``resident``; kept when
        ``run_models(keep_statistics=True)``.
    graphed : int
        Iterations replayed from a CUDA graph (``peekcore.solvers.graphs``).
    cancelled : bool
        Its residual came out clearly negative once (warned).
    """

    rank: int
    seed: int | None
    a: torch.Tensor
    resident: list[torch.Tensor]
    history: FitHistory = field(default_factory=FitHistory)
    active: bool = True
    dead_seen: bool = False
    statistics: tuple[torch.Tensor, torch.Tensor] | None = None
    graphed: int = 0
    cancelled: bool = False


@dataclass
class Problem:
    """A validated data source, kernel and settings (what ``prepare`` returns).

    ``shape`` is the whole data's; in a data-parallel fit ``source`` holds this
    process's rows ``comm.lo .. comm.hi`` of it. ``source`` reads the data
    multiplied by ``scale``, a power of two (``peekcore.solvers.scaling``;
    1.0 unless the data's magnitude is far from 1): the factors, statistics and
    ``||X||^2`` of a run are in that scale, and ``engine.finish_model`` undoes
    it. ``settings.chunk_size`` is what :func:`plan_chunks` chose.
    """

    source: ChunkSource
    shape: tuple[int, ...]
    stored: str
    kernel: PassKernel
    settings: RunSettings
    comm: Communicator = field(default_factory=Communicator)
    #: where the data came from (``sources.describe_source``), recorded in results
    origin: dict = field(default_factory=dict)
    scale: float = 1.0

    @property
    def device(self) -> torch.device:
        """Where the fit computes: its kernel's device (the one record of it)."""
        return self.kernel.device

    def initializer(self, init: Any, *, nonneg: bool | None = None) -> Initializer:
        """The initializer of ``init`` over this problem's data, chunks and device.

        ``nonneg`` defaults to whether the method is HALS.
        """
        return Initializer(
            init,
            self.source,
            nonneg=self.settings.method == HALS if nonneg is None else nonneg,
            chunk_size=self.settings.chunk_size,
            compute_dtype=self.settings.compute_dtype,
            device=self.device,
            comm=self.comm,
        )


def prepare(
    data: Any,
    *,
    method: str,
    n_iter_max: int,
    tol: float,
    chunk_size: int | None,
    max_chunk_bytes: int | None,
    dtype: Any,
    device: str | torch.device,
    kernel: str | PassKernel | None,
    sweeps: int = 1,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 1,
    distributed: bool | None = None,
    fixed_modes: Any = None,
) -> Problem:
    """Check the arguments of a fit and pick its kernel, chunking and process shard."""
    source = unscaled(as_source(data))  # a nested fit (a sweep's refinement) scales anew
    shape = check_shape(tuple(int(n) for n in source.shape))
    whole = source
    comm = communicator(distributed, shape[0], natural_chunk_size(source) or 1)
    if comm.active:
        source = ShardSource(source, comm.lo, comm.hi)
    stored = dtype_name(source.dtype)
    n_iter_max, tol, sweeps = check_iterations(n_iter_max, tol, sweeps)
    compute = compute_dtype_for(stored, dtype)
    # every process samples the whole data, so all pick the same scale
    scale = choose_scale(whole, compute)
    if scale != 1.0:
        source = ScaledSource(source, scale)
    checkpoint_every = check_checkpoint_every(checkpoint_every)
    if checkpoint is not None and comm.rank == 0:  # before any pass: none is lost to it
        check_output_file(checkpoint, "checkpoints")
    kern = get_kernel(kernel, check_device(device))
    settings = RunSettings(
        method=method,
        n_iter_max=n_iter_max,
        tol=tol,
        chunk_size=plan_chunks(
            source, kern, chunk_size=chunk_size, max_chunk_bytes=max_chunk_bytes, shape=shape
        ),
        compute_dtype=compute,
        sweeps=sweeps if method == HALS else 0,
        checkpoint=Path(checkpoint) if checkpoint is not None else None,
        checkpoint_every=checkpoint_every,
        fixed_modes=check_fixed_modes(fixed_modes, len(shape)),
    )
    return Problem(source, shape, stored, kern, settings, comm, describe_source(data), scale)


def samples_per_chunk(
    samples: int,
    per_sample: int,
    *,
    chunk_size: int | None = None,
    budget: int,
    natural: int | None = None,
    alone_bytes: int | None = None,
) -> int:
    """Samples per chunk: ``chunk_size`` if given, else as many as fit in ``budget`` bytes.

    ``natural``: the source's own chunk in samples (a store's stored chunks);
    the chunk is then the largest multiple of it in the budget (at least one),
    so that reads stay whole stored chunks. ``alone_bytes``: a natural chunk
    of at least this many bytes (and within the budget) is used alone instead
    (whole stored chunks come without a copy). Never more than ``samples``.
    """
    if chunk_size is not None:
        return check_int(chunk_size, "chunk_size", purpose=" (samples per chunk)")
    if natural is not None and natural >= 1:
        if alone_bytes is not None and alone_bytes <= natural * per_sample <= budget:
            return min(samples, natural)
        return max(1, min(samples, max(1, budget // (natural * per_sample)) * natural))
    return max(1, min(samples, budget // per_sample))


def plan_chunks(
    source: ChunkSource,
    kernel: PassKernel,
    *,
    chunk_size: int | None = None,
    max_chunk_bytes: int | None = None,
    shape: tuple[int, ...] | None = None,
) -> int:
    """Samples per chunk of a pass of ``kernel`` over ``source``: the one chunk policy.

    Parameters
    ----------
    source : ChunkSource
        What the pass reads; its optional ``chunk_size`` (a store's stored
        chunk) and ``device`` shape the plan.
    kernel : PassKernel
        What computes the pass; its device sets the byte budget.
    chunk_size : int, optional
        Samples per chunk, used as given (checked).
    max_chunk_bytes : int, optional
        Byte budget of a chunk. Default: ``DEFAULT_MAX_CHUNK_BYTES`` on the
        CPU, ``DEVICE_RESIDENT_CHUNK_BYTES`` for data already on the kernel's
        GPU, ``DEVICE_STREAMED_CHUNK_BYTES`` for data copied to it.
    shape : tuple of int, optional
        The whole data's shape when ``source`` is one process's shard
        (default ``source.shape``).

    Returns
    -------
    int
        Samples per chunk: with the default budget on the CPU, a stored chunk
        of at least ``NATURAL_CHUNK_ALONE_BYTES`` is read alone; else whole
        stored chunks are grouped up to the budget (see :func:`samples_per_chunk`).
    """
    shape = tuple(source.shape) if shape is None else shape
    itemsize = torch.empty((), dtype=TORCH_DTYPES[dtype_name(source.dtype)]).element_size()
    on_gpu = kernel.device.type == "cuda"
    if max_chunk_bytes is not None:
        budget = int(max_chunk_bytes)
    elif not on_gpu:
        budget = DEFAULT_MAX_CHUNK_BYTES
    elif on_device(source, kernel.device):
        budget = DEVICE_RESIDENT_CHUNK_BYTES
    else:
        budget = DEVICE_STREAMED_CHUNK_BYTES
    # on a GPU fewer, larger chunks pay more than a saved host copy
    alone = NATURAL_CHUNK_ALONE_BYTES if max_chunk_bytes is None and not on_gpu else None
    return samples_per_chunk(
        shape[0],
        math.prod(shape[1:]) * itemsize,
        chunk_size=chunk_size,
        budget=budget,
        natural=natural_chunk_size(source),
        alone_bytes=alone,
    )


def new_state(
    initializer: Initializer,
    rank: int,
    seed: int | None,
    compute: torch.dtype,
    comm: Communicator | None = None,
) -> ModelState:
    """A model at its initial factors (this process's rows of the sample factor)."""
    a64, resident = initializer.factors(rank, seed)
    if comm is not None and comm.active:
        a64 = a64[comm.lo : comm.hi]
    return ModelState(rank, seed, a64.to(compute).contiguous(), resident)
