"""CUDA implementation of the pass: cuBLAS for the two contractions, custom kernels for the rest.

Per chunk ``X_b`` (``b x J`` on the GPU, float16 / bfloat16 / float32):

1. ``M_b = X_b @ KR`` in one cuBLAS GEMM with float32 output. For half storage
   the Khatri-Rao matrix is split into half terms ``[KR_0 | KR_1 | ...]``
   (2 for float16, 3 for bfloat16), so the product keeps about 22-24 bits of
   the float64 factors at no extra memory traffic (the GEMM is bound by
   reading ``X_b``).
2. the chunk's rows of A in float64: ALS as one small GEMM ``M G^-1``, HALS
   by ``update_rows`` (custom, one thread per row).
3. ``AtA += A_b^T A_b`` (float64).
4. ``T += A_b^T X_b``: for half storage, A_b is split the same way (scaled by
   powers of two per column), ``P = [A_0 | A_1 | ...]^T X_b`` runs in cuBLAS
   and ``add_split`` (custom) folds ``P`` into ``T``.

Kernels are launched on torch's current stream; nothing synchronizes the host.
The KR matrix is built once per pass (``khatri_rao``, custom).

The custom kernels run through one launcher chosen when the kernel is made
(:mod:`.cuda_launch`): CuPy, the compiled extension, or, with neither
(``backend="torch"``), torch operations taking the same steps with the same
rounding, so the pass works on a GPU without either and its logic is tested
on the CPU (``tests/test_kernels.py``).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..errors import InvalidArgumentError
from .base import ALS, PassKernel, PassOptions
from .cuda_launch import (
    KERNEL_NAMES,
    MAX_RANK,
    Launcher,
    launch_backend,
    make_launcher,
    pow2_scale,
    split_into,
)
from .reference import TorchKernel

__all__ = ["CudaKernel", "KERNEL_NAMES", "MAX_RANK", "launch_backend", "split_into"]

# Half terms per float64 value in the split GEMMs: float16 keeps 11 bits a term
# (2 terms ~ 22 bits), bfloat16 8 bits (3 terms ~ 24 bits, float32's precision).
SPLIT_TERMS = {torch.float16: 2, torch.bfloat16: 3, torch.float32: 1}


_OUT_DTYPE_MM: dict[tuple[str, torch.dtype], bool] = {}  # has mm(..., out_dtype=) there?


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with float32 output for half inputs (cuBLAS accumulates in float32)."""
    if a.dtype == torch.float32:
        return a @ b
    key = (a.device.type, a.dtype)
    if _OUT_DTYPE_MM.get(key, True):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE_MM[key] = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_MM[key] = False
    # older torch, or no such kernel on this device: upcast (exact for half
    # values, but reads the chunk as float32)
    return a.float() @ b.float()


class _Factors:
    """Resident factors of one pass and the Khatri-Rao matrices built from them."""

    def __init__(self, factors: list[torch.Tensor]) -> None:
        self.f64 = [f.to(torch.float64).contiguous() for f in factors]
        self.kr: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}


class CudaKernel(PassKernel):
    """The pass on a CUDA device (float32 accumulation; float64 goes to the torch path)."""

    name = "cuda"

    def __init__(self, device: str | torch.device = "cuda", backend: str | None = None) -> None:
        super().__init__(device)
        backend = backend or launch_backend()
        if self.device.type != "cuda" and backend in ("cupy", "extension"):
            raise InvalidArgumentError(
                f"the cuda kernel needs a CUDA device, got {self.device} (backend='torch' runs "
                "its steps as torch operations on any device)"
            )
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        #: the five custom kernels, launched by the backend chosen here
        self.launcher: Launcher = make_launcher(backend, self.device)
        self._reference = TorchKernel(self.device)

    @property
    def backend(self) -> str:
        """How the custom kernels run: ``"cupy"``, ``"extension"`` or ``"torch"``."""
        return self.launcher.name

    # -- contract -----------------------------------------------------------
    def prepare_factors(self, factors: list[torch.Tensor], dtype: torch.dtype) -> _Factors:
        return _Factors([f.to(self.device) for f in factors])

    def _khatri_rao(
        self, holder: _Factors, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype in holder.kr:
            return holder.kr[dtype]
        fs = holder.f64
        rank = fs[0].shape[1]
        width = math.prod(f.shape[0] for f in fs)
        terms = SPLIT_TERMS[dtype]
        if terms > 1:  # largest |KR[:, r]| is the product of the columns' largest entries
            amax = torch.ones(rank, dtype=torch.float64, device=self.device)
            for f in fs:
                amax = amax * f.abs().amax(dim=0)
            scale = pow2_scale(amax)
        else:
            scale = torch.ones(rank, dtype=torch.float64, device=self.device)
        out = torch.empty((width, terms * rank), dtype=dtype, device=self.device)
        self.launcher.khatri_rao(fs, scale, terms, out)
        holder.kr[dtype] = (out, 1.0 / scale)
        return holder.kr[dtype]

    def _pass(
        self, chunk, factors: _Factors, g, a_rows, stats, options: PassOptions
    ) -> float | torch.Tensor:
        rank = a_rows.shape[1]
        widths = tuple(options.blocks) if options.blocks else (rank,)
        # float64 accumulation: the torch path, one model's way (it needs no blocks)
        if stats.t.dtype != torch.float32:
            single = replace(options, blocks=None)
            return self._reference._pass(chunk, factors.f64, g, a_rows, stats, single)
        x = chunk.to(self.device, non_blocking=True).contiguous()
        if x.dtype == torch.float64:
            x = x.to(torch.float32)
        rows, width = x.shape
        norm2: float | torch.Tensor = 0.0
        if options.want_norm:
            norm2 = self.launcher.sum_squares(x)
        kr, inv_kr_scale = self._khatri_rao(factors, x.dtype)
        half = x.dtype != torch.float32
        m = mm_f32(x, kr)
        g = g.to(self.device, torch.float64).contiguous()
        if options.update == ALS:
            # one float64 GEMM beats the one-thread-per-row kernel here (benchmarks/bench_gpu.py)
            m64 = m.view(rows, -1, rank).sum(dim=1, dtype=torch.float64) * inv_kr_scale
            a_rows.copy_(m64 @ g)
        else:  # every model's rows from its own block of G, one launch
            self.launcher.update_rows(
                m, inv_kr_scale, g, a_rows, widths, hals=True, sweeps=options.sweeps
            )
        a64 = a_rows.to(torch.float64)
        stats.ata.addmm_(a64.T, a64)
        if half:
            scale = pow2_scale(a_rows.abs().amax(dim=0))
            terms = SPLIT_TERMS[x.dtype]
            a2 = torch.empty((rows, terms * rank), dtype=x.dtype, device=self.device)
            self.launcher.split_rows(a_rows, scale, a2)
            p = mm_f32(a2.T, x)
            self.launcher.add_split(p, 1.0 / scale, stats.t)
        else:
            stats.t.addmm_(a_rows.T, x)
        stats.rows += rows
        return norm2

    def hals_update(self, f, m, g, sweeps, blocks=None) -> torch.Tensor:
        rank = f.shape[1]
        out = f.contiguous().clone()
        ones = torch.ones(rank, dtype=torch.float64, device=self.device)
        widths = tuple(blocks) if blocks else (rank,)
        self.launcher.update_rows(
            m.contiguous(), ones, g.contiguous(), out, widths, hals=True, sweeps=sweeps
        )
        return out

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
