"""The kernel contract: one per-chunk pass, several implementations.

A pass over the data is a loop over chunks ``X_b`` (``b x J``, ``J`` the
product of the resident dimensions). For each chunk a kernel

1. forms the chunk's MTTKRP ``M_b = X_b (F_1 ⊙ ... ⊙ F_d)`` (``b x R``) without
   building the Khatri-Rao product,
2. updates the chunk's rows of the sample factor: ``A_b = M_b G^-1`` (ALS,
   ``g`` is ``G^-1``) or ``sweeps`` HALS sweeps from the old rows (``g`` is
   ``G``), where ``G`` is the Hadamard product of the resident Grams,
3. accumulates ``T += A_b^T X_b`` (``R x J``) and ``AtA += A_b^T A_b``
   (float64),
4. returns the chunk's sum of squares when asked (the first pass).

Everything is a torch tensor on the kernel's device: ``factors`` and ``a_rows``
in the compute dtype, ``g`` and ``ata`` in float64. Implementations:
``"torch"`` (the plain reference, any device), ``"native"`` (the C++
extension, CPU) and ``"cuda"`` (CUDA kernels, GPU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .ops import hals_rows, khatri_rao

__all__ = ["PassKernel", "PassOptions", "PassStatistics", "ALS", "HALS", "khatri_rao"]

ALS = "als"
HALS = "hals"


@dataclass
class PassStatistics:
    """Sufficient statistics of one pass.

    Attributes
    ----------
    t : torch.Tensor
        ``R x J``, ``X x_0 A^T`` flattened over the resident modes.
    ata : torch.Tensor
        ``R x R`` float64, ``A^T A``.
    norm2 : float
        ``||X||^2`` when the pass computed it, else 0.
    rows : int
        Samples seen.
    """

    t: torch.Tensor
    ata: torch.Tensor
    norm2: float = 0.0
    rows: int = 0


@dataclass(frozen=True)
class PassOptions:
    """The keywords of ``PassKernel.pass_chunk``, bundled for the implementations.

    Attributes
    ----------
    dims : tuple of int
        The resident dimensions (their product is the chunk's width ``J``).
    update : str
        ``ALS`` or ``HALS``: how the chunk's rows of the sample factor are updated.
    sweeps : int
        HALS sweeps over the rows (ignored by ALS).
    want_norm : bool
        Whether to return the chunk's sum of squares.
    blocks : tuple of int or None
        The ranks of models stacked side by side, or None for one model.
    """

    dims: tuple[int, ...]
    update: str
    sweeps: int
    want_norm: bool
    blocks: tuple[int, ...] | None = None


class PassKernel(ABC):
    """One implementation of the per-chunk pass (see the module docstring)."""

    #: short name used by ``kernel=`` arguments and in model metadata
    name: str = "abstract"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def new_statistics(self, rank: int, width: int, dtype: torch.dtype) -> PassStatistics:
        """Zeroed statistics for a pass with ``rank`` components over ``width`` columns."""
        return PassStatistics(
            t=torch.zeros((rank, width), dtype=dtype, device=self.device),
            ata=torch.zeros((rank, rank), dtype=torch.float64, device=self.device),
        )

    def prepare_factors(self, factors: list[torch.Tensor], dtype: torch.dtype) -> list:
        """Resident factors in the form ``pass_chunk`` wants (default: contiguous tensors)."""
        return [f.to(device=self.device, dtype=dtype).contiguous() for f in factors]

    def pass_chunk(
        self,
        chunk: torch.Tensor,
        factors: list,
        g: torch.Tensor,
        a_rows: torch.Tensor,
        stats: PassStatistics,
        *,
        dims: tuple[int, ...],
        update: str,
        sweeps: int,
        want_norm: bool,
        blocks: tuple[int, ...] | None = None,
    ) -> float | torch.Tensor:
        """Run the pass on one chunk (``b x J``, stored dtype) and update ``stats``.

        ``blocks`` gives the ranks of models stacked side by side (a rank sweep):
        ``g`` is then block diagonal and only the diagonal blocks of ``ata`` are
        used, so a kernel may skip the rest. Returns the chunk's sum of squares
        (float64) when ``want_norm``, else 0; a kernel may return a 0-d tensor
        to avoid a device synchronization.
        """
        options = PassOptions(dims, update, sweeps, want_norm, blocks)
        return self._pass(chunk, factors, g, a_rows, stats, options)

    @abstractmethod
    def _pass(self, chunk, factors, g, a_rows, stats, options: PassOptions) -> float | torch.Tensor:
        """The pass itself: ``pass_chunk`` with its keywords bundled in ``options``."""

    def hals_update(
        self,
        f: torch.Tensor,
        m: torch.Tensor,
        g: torch.Tensor,
        sweeps: int,
        blocks: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """HALS sweeps on a resident factor (``I x R`` float64) from its MTTKRP and Gram.

        ``blocks``: ranks of models stacked side by side (``g`` block diagonal);
        each model is solved from its own block. Returns a new tensor; the
        default is the torch reference.
        """
        out = f.clone()
        lo = 0
        for w in blocks or (f.shape[1],):
            hi = lo + w
            out[:, lo:hi] = hals_rows(out[:, lo:hi], m[:, lo:hi], g[lo:hi, lo:hi], sweeps)
            lo = hi
        return out

    def synchronize(self) -> None:  # noqa: B027 - optional hook, a no-op on the CPU
        """Wait for queued device work (no-op on the CPU)."""
