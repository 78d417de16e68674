"""Data-parallel fits on torch.distributed: shards of the sample mode, summed statistics.

Each process streams its own rows of the sample mode and keeps its rows of the
sample factor ``A``; after every pass the processes sum their statistics
(``T = X x_0 A^T``, ``A^T A``, and ``||X||^2`` in the first pass) with one
all-reduce of ``R x (prod of the non-sample dims) + R x R`` values, so every
process updates identical resident factors. Results equal a single-process
fit to rounding.

Launch with ``torchrun --nproc-per-node N script.py`` (or several nodes, see
README.md): the solvers find the initialized process group, or initialize it
from torchrun's environment when asked (``distributed=True``). A process that
dies makes the others fail in a collective within ``timeout`` seconds instead
of hanging.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidArgumentError, PeekcoreError, RuntimeEnvironmentError

__all__ = [
    "Communicator",
    "PeerFailure",
    "ShardSource",
    "communicator",
    "init_from_env",
    "shard_bounds",
]


class PeerFailure(PeekcoreError, RuntimeError):
    """Another process of a data-parallel fit failed (or stalled past the timeout)."""


DEFAULT_TIMEOUT_S = 120


def shard_bounds(n: int, rank: int, world: int, align: int = 1) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of process ``rank``: contiguous, in whole units of ``align`` rows.

    The units (a store's stored chunks, so that each process reads whole chunk
    files) are shared out with counts differing by at most one; the last unit
    may be short. With fewer units than processes, rows are shared out one by
    one instead (sizes differing by at most one).
    """
    units = -(-n // align) if align > 1 else n
    if align > 1 and units < world:
        align, units = 1, n
    base, extra = divmod(units, world)
    lo = rank * base + min(rank, extra)
    hi = lo + base + (1 if rank < extra else 0)
    return min(n, lo * align), min(n, hi * align)


@dataclass
class Communicator:
    """The process group of a fit (a no-op for a single process).

    Attributes
    ----------
    rank, world : int
    lo, hi : int
        This process's rows of the sample mode.
    n : int
        Samples in all.
    align : int
        The shards are whole units of this many rows (:func:`shard_bounds`).
    """

    rank: int = 0
    world: int = 1
    lo: int = 0
    hi: int = 0
    n: int = 0
    align: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def _collective(self, op, *args) -> None:
        try:
            op(*args)
        except RuntimeError as err:  # gloo / NCCL: a peer died, or the timeout passed
            raise PeerFailure(
                f"process {self.rank} of {self.world}: a collective of this data-parallel "
                "fit failed, so another process died, was killed or stalled past the "
                "timeout; the fit stopped (resume from its last checkpoint). "
                f"Backend said: {str(err).splitlines()[0] if str(err) else err!r}"
            ) from err

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes, in place."""
        if self.active:
            self._collective(torch.distributed.all_reduce, t)
        return t

    def allreduce_scalar(self, value: float, device: torch.device) -> float:
        """Sum a number over all processes."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        self._collective(torch.distributed.all_reduce, t)
        return float(t[0])

    def gather_rows(self, a: torch.Tensor) -> torch.Tensor:
        """The full ``N x R`` from every process's rows (on every process)."""
        if not self.active:
            return a
        sizes = [shard_bounds(self.n, r, self.world, self.align) for r in range(self.world)]
        longest = max(hi - lo for lo, hi in sizes)
        padded = torch.zeros((longest, *a.shape[1:]), dtype=a.dtype, device=a.device)
        padded[: a.shape[0]] = a
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._collective(torch.distributed.all_gather, parts, padded.contiguous())
        return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, sizes, strict=True)])


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialize the default process group from torchrun's environment variables."""
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeEnvironmentError(
            "distributed=True needs a process group: launch with torchrun (which sets RANK, "
            "WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or call torch.distributed."
            "init_process_group yourself"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    # peekcore made the group, so peekcore takes it down: a process that exits
    # with a live gloo group can abort in its threads' destructors ("terminate
    # called without an active exception"), failing a fit that had finished
    atexit.register(_destroy_group)


def _destroy_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def communicator(distributed: bool | None, n: int, align: int = 1) -> Communicator:
    """The communicator of a fit over ``n`` samples.

    ``distributed=None`` runs data-parallel when torch.distributed is
    initialized with several processes; ``True`` initializes it from the
    environment if needed; ``False`` always fits in this process alone.
    ``align``: the source's own chunk (a store's stored chunks); each process
    then gets whole chunks.
    """
    dist = torch.distributed
    if distributed is False or not dist.is_available():
        return Communicator(0, 1, 0, n, n)
    if distributed is True:
        init_from_env()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Communicator(0, 1, 0, n, n)
    rank, world = dist.get_rank(), dist.get_world_size()
    if n < world:
        raise InvalidArgumentError(f"{n} samples cannot be split over {world} processes")
    lo, hi = shard_bounds(n, rank, world, align)
    return Communicator(rank, world, lo, hi, n, align)


class ShardSource:
    """Rows ``[lo, hi)`` of a chunk source (itself a chunk source).

    Uses the source's ``shard(lo, hi)`` method when it has one (arrays and
    stores read only their rows); otherwise it reads the source's chunks and
    keeps the rows that fall in the range.
    """

    def __init__(self, source: Any, lo: int, hi: int) -> None:
        self.source, self.lo, self.hi = source, lo, hi
        self._inner = source.shard(lo, hi) if hasattr(source, "shard") else None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.hi - self.lo, *tuple(self.source.shape)[1:])

    @property
    def chunk_size(self) -> int | None:
        """The source's own chunk, when this shard starts on one of its boundaries."""
        natural = getattr(self.source, "chunk_size", None)
        aligned = isinstance(natural, int) and natural >= 1 and self.lo % natural == 0
        return natural if aligned else None

    @property
    def first_sample(self) -> int:
        """The whole data's index of this shard's first sample (errors name samples by it)."""
        return self.lo

    @property
    def dtype(self) -> Any:
        return self.source.dtype

    @property
    def device(self) -> str:
        return str(getattr(self.source, "device", "cpu"))

    def chunks(self, chunk_size: int) -> Iterator[Any]:
        if self._inner is not None:
            yield from self._inner.chunks(chunk_size)
            return
        offset = 0
        for chunk in self.source.chunks(chunk_size):
            b = len(chunk)
            lo, hi = max(self.lo - offset, 0), min(self.hi - offset, b)
            if lo < hi:
                yield chunk[lo:hi]
            offset += b
            if offset >= self.hi:
                break
