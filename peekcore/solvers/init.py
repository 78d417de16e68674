"""Initial factors: seeded random, Gram eigenvectors (one streamed pass), or a given model."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import InvalidArgumentError
from ..model import CPModel
from ..sources import ChunkSource
from .passes import check_not_all_zeros, gram_pass
from .scaling import ScaledSource

__all__ = ["Initializer"]


def _is_cp_tensor(obj: Any) -> bool:
    return type(obj).__name__ == "CPTensor" or (
        isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], (list, tuple))
    )


class Initializer:
    """Initial factors for one or many models of the same data.

    The Gram pass of ``init="gram"`` runs once and serves every model.

    Parameters
    ----------
    init : {"random", "gram"}, CPModel or TensorLy CPTensor
    source : ChunkSource
    nonneg : bool
        Nonnegative fit: uniform random factors, positive parts of eigenvectors.
    chunk_size : int
    compute_dtype : torch.dtype
    device : torch.device
    comm : Communicator, optional
        For a data-parallel fit: the Gram pass is summed over the processes, and
        every factor is drawn for all ``N`` samples (each process keeps its rows).
    """

    def __init__(
        self,
        init: Any,
        source: ChunkSource,
        *,
        nonneg: bool,
        chunk_size: int,
        compute_dtype: torch.dtype,
        device: torch.device,
        comm: Any = None,
    ) -> None:
        is_model = isinstance(init, CPModel) or _is_cp_tensor(init)
        if not (isinstance(init, str) and init in ("random", "gram")) and not is_model:
            raise InvalidArgumentError(
                f"init must be 'random', 'gram', a CPModel or a TensorLy CPTensor; got {init!r}"
            )
        self.init = init
        self.source = source
        # the whole data's shape (a process of a data-parallel fit reads only its rows)
        self.shape = tuple(int(n) for n in source.shape)
        if comm is not None and comm.active:
            self.shape = (comm.n, *self.shape[1:])
        self.nonneg = nonneg
        self.chunk_size = chunk_size
        self.compute_dtype = compute_dtype
        self.device = device
        self.comm = comm
        self.norm2: float | None = None  # measured by the Gram pass
        self._eig: list[torch.Tensor] | None = None

    @property
    def name(self) -> str:
        return self.init if isinstance(self.init, str) else type(self.init).__name__

    def factors(self, rank: int, seed: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample factor (``N x R``) and resident factors (float64) for one model."""
        shape, device = self.shape, self.device
        rng = np.random.default_rng(seed)
        if isinstance(self.init, str) and self.init == "random":
            # signed data: Gaussian columns (well spread); nonnegative fits: uniform [0, 1)
            draw = rng.random if self.nonneg else rng.standard_normal
            return self._to_device([draw((n, rank)) for n in shape])
        if isinstance(self.init, str) and self.init == "gram":
            if self._eig is None:
                grams, self.norm2 = gram_pass(
                    self.source, self.chunk_size, self.compute_dtype, device, self.nonneg
                )
                if self.comm is not None and self.comm.active:  # sum over the processes' rows
                    for g in grams:
                        self.comm.allreduce_(g)
                    self.norm2 = self.comm.allreduce_scalar(self.norm2, device)
                check_not_all_zeros(self.norm2)  # as the first fit pass does without gram init
                self._eig = []
                for g in grams:
                    vals, vecs = torch.linalg.eigh(g)
                    self._eig.append(vecs[:, torch.argsort(vals, descending=True)])
            resident = []
            for vecs, n in zip(self._eig, shape[1:], strict=True):
                lead = vecs[:, :rank]
                if lead.shape[1] < rank:  # rank above this mode's dimension: pad at random
                    extra = torch.as_tensor(rng.random((n, rank - lead.shape[1])), device=device)
                    lead = torch.cat([lead, extra / math.sqrt(n)], dim=1)
                signs = torch.sign(lead.sum(dim=0))
                lead = lead * torch.where(signs == 0, 1.0, signs)
                if self.nonneg:
                    lead = torch.clamp(lead, min=0) + 1e-3 / math.sqrt(n)
                resident.append(lead.contiguous())
            # the first pass solves the sample factor from the resident ones (HALS too: its
            # columns' updates divide by the resident columns' norms, which are not zero), so
            # it starts at zero; not a dead component (engine.reseed_dead)
            a = torch.zeros((shape[0], rank), dtype=torch.float64, device=device)
            return a, resident
        model = self.init if isinstance(self.init, CPModel) else CPModel.from_tensorly(self.init)
        if model.shape != shape or model.rank != rank:
            raise InvalidArgumentError(
                f"the initial model has shape {model.shape} and rank {model.rank}; the data has "
                f"shape {shape} and rank {rank} was asked"
            )
        # in the scale the data is read in (peekcore.solvers.scaling)
        scale = self.source.scale if isinstance(self.source, ScaledSource) else 1.0
        mats = [f * (model.weights * scale) if i == 0 else f for i, f in enumerate(model.factors)]
        if self.nonneg and any(np.any(m < 0) for m in mats):
            raise InvalidArgumentError("a nonnegative fit needs a nonnegative initial model")
        return self._to_device(mats)

    def _to_device(self, mats: list[np.ndarray]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ts = [torch.as_tensor(np.asarray(m, dtype=np.float64), device=self.device) for m in mats]
        return ts[0].contiguous(), [t.contiguous() for t in ts[1:]]
