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

The custom kernels launch through CuPy or the compiled extension; with
neither (``backend="torch"``) each runs as torch operations instead, the same
steps with the same rounding, so the pass works on a GPU without either and
its logic is tested on the CPU (``tests/test_cuda_pass.py``).
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import torch

from .base import ALS, PassKernel, PassStatistics, khatri_rao
from .cuda_loader import cupy_or_error, load_module
from .reference import TorchKernel, hals_rows

__all__ = ["CudaKernel", "KERNEL_NAMES"]

_TYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}
KERNEL_NAMES = (
    [f"peekcore::sum_squares<{t}>" for t in ("__half", "__nv_bfloat16", "float", "double")]
    + [f"peekcore::khatri_rao<{t}>" for t in ("float", "__half", "__nv_bfloat16")]
    + ["peekcore::update_rows<float, float>", "peekcore::update_rows<double, double>"]
    + [f"peekcore::split_rows<{t}>" for t in ("__half", "__nv_bfloat16")]
    + ["peekcore::add_split"]
)
MAX_RANK = 64  # kMaxRank in csrc/cuda/cp_pass.cu
# Half terms per float64 value in the split GEMMs: float16 keeps 11 bits a term
# (2 terms ~ 22 bits), bfloat16 8 bits (3 terms ~ 24 bits, float32's precision).
SPLIT_TERMS = {torch.float16: 2, torch.bfloat16: 3, torch.float32: 1}
_THREADS = 256


_TYPE_CODES = {"__half": 0, "__nv_bfloat16": 1, "float": 2, "double": 3}


def launch_backend() -> str:
    """How the custom kernels run: ``"cupy"``, ``"extension"`` or ``"torch"``.

    ``"cupy"``: RawModule over NVRTC; ``"extension"``: peekcore._core built with
    CUDA; ``"torch"``: the same steps as torch operations (no custom kernel;
    what a machine with neither gets, and what runs this class on the CPU).
    ``PEEKCORE_CUDA_BACKEND`` picks one; by default CuPy when it imports, else
    the extension when it has CUDA, else torch.
    """
    import os

    from .. import _native

    wanted = os.environ.get("PEEKCORE_CUDA_BACKEND", "")
    has_ext = _native.available() and hasattr(_native.core(), "cuda_sum_squares")
    if wanted == "torch":
        return "torch"
    if wanted == "extension" or (wanted != "cupy" and not _has_cupy() and has_ext):
        if not has_ext:
            raise ImportError(
                "PEEKCORE_CUDA_BACKEND=extension, but peekcore._core was built without CUDA: "
                "reinstall with PEEKCORE_CUDA=1 pip install . (needs the CUDA toolkit)"
            )
        return "extension"
    if wanted == "cupy" or _has_cupy():
        return "cupy"
    return "torch"


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def _i32(v) -> np.int32:
    """Kernel ``int`` argument (CuPy passes numpy scalars by their exact width)."""
    return np.int32(v)


def _i64(v) -> np.int64:
    """Kernel ``long long`` argument."""
    return np.int64(v)


def _blocks(n: int, threads: int = _THREADS) -> int:
    return max(1, math.ceil(n / threads))


def _pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-column powers of two that bring the largest magnitude to (0.5, 1]."""
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    return torch.exp2(-torch.ceil(torch.log2(safe)))


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


def split_into(v: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` (``n x terms*R``, half) = the terms of ``v`` (``n x R``, float64).

    The torch form of the kernels' ``split_value``: the nearest half value,
    then the nearest half value of what it missed, and so on.
    """
    rank = v.shape[1]
    for t in range(out.shape[1] // rank):
        part = v.to(out.dtype)
        out[:, t * rank : (t + 1) * rank] = part
        v = v - part.to(torch.float64)


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
        self.backend = backend or launch_backend()
        if self.backend not in ("cupy", "extension", "torch"):
            raise ValueError(f"backend must be 'cupy', 'extension' or 'torch', got {backend!r}")
        if self.device.type != "cuda" and self.backend != "torch":
            raise ValueError(
                f"the cuda kernel needs a CUDA device, got {self.device} (backend='torch' runs "
                "its steps as torch operations on any device)"
            )
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.backend == "cupy":
            self.cupy = cupy_or_error()
            with self.cupy.cuda.Device(self.device.index):
                self.module = load_module("cp_pass", KERNEL_NAMES)
        elif self.backend == "extension":
            from .._native import core

            self.core = core()
        self._reference = TorchKernel(self.device)
        self._streams: dict[int, object] = {}
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cupy_stream(self, stream: torch.cuda.Stream):
        """CuPy's view of a torch stream (cached per stream)."""
        ptr = stream.cuda_stream
        if ptr not in self._streams:
            cp = self.cupy
            try:
                self._streams[ptr] = cp.cuda.Stream.from_external(stream)
            except Exception:  # noqa: BLE001 - older CuPy, or no stream protocol in torch
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._streams[ptr] = cp.cuda.ExternalStream(ptr)
        return self._streams[ptr]

    # -- launching ----------------------------------------------------------
    def _launch(
        self, name: str, grid: int | tuple, block: int, args: tuple, shared: int = 0
    ) -> None:
        stream = torch.cuda.current_stream(self.device)
        if self.backend == "extension":
            self._launch_extension(name, grid, args, stream.cuda_stream)
            return
        cp = self.cupy
        # zero-copy through __cuda_array_interface__; CuPy has no bfloat16, and
        # kernels take raw pointers, so bfloat16 travels as its int16 bits
        conv = tuple(
            cp.asarray(a.view(torch.int16) if a.dtype == torch.bfloat16 else a)
            if isinstance(a, torch.Tensor)
            else a
            for a in args
        )
        with cp.cuda.Device(self.device.index), self._cupy_stream(stream):
            grid = grid if isinstance(grid, tuple) else (grid,)
            self.module.get_function(name)(grid, (block,), conv, shared_mem=shared)

    def _launch_extension(self, name: str, grid, args: tuple, stream: int) -> None:
        """The same kernel through peekcore._core's launchers (built with PEEKCORE_CUDA=ON)."""
        c = self.core
        a = [x.data_ptr() if isinstance(x, torch.Tensor) else int(x) for x in args]
        kind = name.removeprefix("peekcore::").split("<")[0]
        code = _TYPE_CODES.get(
            name[name.find("<") + 1 : name.find(",") if "," in name else name.find(">")], 2
        )
        if kind == "sum_squares":
            c.cuda_sum_squares(code, a[0], a[1], a[2], int(grid), stream)
        elif kind == "khatri_rao":
            c.cuda_khatri_rao(code, *a, stream)
        elif kind == "split_rows":
            c.cuda_split_rows(code, *a, stream)
        elif kind == "add_split":
            c.cuda_add_split(*a, stream)
        else:  # pragma: no cover - a kernel added without a launcher
            raise NotImplementedError(f"no extension launcher for {name}")

    def _offsets(self, widths: tuple[int, ...]) -> torch.Tensor:
        """Device int32 column offsets of models of ``widths`` side by side (cached)."""
        table = self._tables.get(("offsets", widths))
        if table is None:
            bounds = [0, *itertools.accumulate(widths)]
            table = torch.tensor(bounds, dtype=torch.int32, device=self.device)
            self._tables[("offsets", widths)] = table
        return table

    def update_rows(
        self,
        m: torch.Tensor,
        inv_scale: torch.Tensor,
        g: torch.Tensor,
        a: torch.Tensor,
        widths: tuple[int, ...],
        *,
        hals: bool,
        sweeps: int,
    ) -> None:
        """Rows of ``a`` from their MTTKRP ``m`` by the ``update_rows`` kernel (in place).

        ``a`` (``rows x R``) holds models of ``widths`` side by side; each model
        uses only its diagonal block of ``g`` (``R x R`` float64). ``m`` is
        ``rows x terms*R`` (the terms are summed, times ``inv_scale``). The
        kernel takes ``a`` and ``m`` both float32 or both float64 and models up
        to ``MAX_RANK`` wide; anything else (and the torch backend) runs the same
        steps as torch operations, model by model.
        """
        rank, rows = a.shape[1], a.shape[0]
        in_kernel = (
            self.backend != "torch"
            and max(widths) <= MAX_RANK
            and a.dtype == m.dtype
            and a.dtype in (torch.float32, torch.float64)
        )
        if not in_kernel:
            terms = m.shape[1] // rank
            lo = 0
            for w in widths:
                hi = lo + w
                msum = sum(
                    m[:, t * rank + lo : t * rank + hi].to(torch.float64) for t in range(terms)
                ) * inv_scale[lo:hi].to(torch.float64)
                block = g[lo:hi, lo:hi].to(torch.float64)
                if hals:
                    rows_new = hals_rows(a[:, lo:hi].to(torch.float64), msum, block, sweeps)
                else:
                    rows_new = msum @ block
                a[:, lo:hi] = rows_new.to(a.dtype)
                lo = hi
            return
        widest = max(widths)
        offsets = self._offsets(widths)
        double = a.dtype == torch.float64
        if self.backend == "extension":
            self.core.cuda_update_rows(
                int(double),
                m.data_ptr(),
                m.shape[1],
                inv_scale.data_ptr(),
                g.data_ptr(),
                offsets.data_ptr(),
                len(widths),
                widest,
                rank,
                rows,
                int(hals),
                sweeps,
                a.data_ptr(),
                torch.cuda.current_stream(self.device).cuda_stream,
            )
            return
        kind = "double, double" if double else "float, float"
        self._launch(
            f"peekcore::update_rows<{kind}>",
            (_blocks(rows, 128), len(widths)),
            128,
            (
                m,
                _i32(m.shape[1]),
                inv_scale,
                g,
                offsets,
                _i32(rank),
                _i64(rows),
                _i32(int(hals)),
                _i32(sweeps),
                a,
            ),
            shared=8 * widest * widest,
        )

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
            scale = _pow2_scale(amax)
        else:
            scale = torch.ones(rank, dtype=torch.float64, device=self.device)
        out = torch.empty((width, terms * rank), dtype=dtype, device=self.device)
        if self.backend == "torch":
            split_into(khatri_rao(fs) * scale, out)
        else:
            ptrs, dims = self._factor_table(fs)
            self._launch(
                f"peekcore::khatri_rao<{_TYPES[dtype]}>",
                _blocks(width * rank),
                _THREADS,
                (ptrs, dims, _i32(len(fs)), _i32(rank), _i64(width), scale, _i32(terms), out),
            )
        holder.kr[dtype] = (out, 1.0 / scale)
        return holder.kr[dtype]

    def _factor_table(self, fs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Device arrays of the factors' addresses and row counts (int64), for ``khatri_rao``.

        Kept per (addresses, rows): the same factors, as in every iteration of a
        fit, need no new host-to-device copy, and none may happen while an
        iteration is being captured as a CUDA graph. Equal keys mean equal
        contents, so a reused address can never make an entry wrong.
        """
        key = tuple((f.data_ptr(), f.shape[0]) for f in fs)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= 64:
                self._tables.pop(next(iter(self._tables)))
            table = self._tables[key] = (
                torch.tensor([p for p, _ in key], dtype=torch.int64, device=self.device),
                torch.tensor([n for _, n in key], dtype=torch.int64, device=self.device),
            )
        return table

    # -- the custom kernels, or their torch form (backend "torch") ------------
    def _sum_squares(self, x: torch.Tensor) -> torch.Tensor:
        """``||x||^2`` as a 0-d float64 tensor (no host synchronization)."""
        out = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.backend == "torch":
            flat = x.reshape(-1)
            step = 1 << 24  # float64 copies of this many values at a time
            for i in range(0, flat.numel(), step):
                out += torch.sum(flat[i : i + step].to(torch.float64) ** 2)
            return out
        n = x.numel()
        self._launch(
            f"peekcore::sum_squares<{_TYPES[x.dtype]}>",
            min(_blocks(n), 8 * 1024),
            _THREADS,
            (x, _i64(n), out),
        )
        return out

    def _split_rows(self, a: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` (``rows x terms*R``, half) = the terms of ``a * scale`` (``a`` float32)."""
        rank, rows = a.shape[1], a.shape[0]
        if self.backend == "torch":
            split_into(a.to(torch.float64) * scale.to(torch.float64), out)
            return
        self._launch(
            f"peekcore::split_rows<{_TYPES[out.dtype]}>",
            _blocks(rows * rank),
            _THREADS,
            (a, scale, _i32(rank), _i64(rows), _i32(out.shape[1] // rank), out),
        )

    def _add_split(self, p: torch.Tensor, inv_scale: torch.Tensor, t: torch.Tensor) -> None:
        """``t`` (``R x J`` float32) += (sum of the terms of ``p``) * ``inv_scale`` per row."""
        rank, width = t.shape
        terms = p.shape[0] // rank
        if self.backend == "torch":
            t += p.view(terms, rank, width).sum(dim=0) * inv_scale[:, None]
            return
        self._launch(
            "peekcore::add_split",
            (min(_blocks(width), 1024), rank),
            _THREADS,
            (p, inv_scale, _i32(rank), _i64(width), _i32(terms), t),
        )

    def pass_chunk(
        self,
        chunk: torch.Tensor,
        factors: _Factors,
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
        rank = a_rows.shape[1]
        widths = tuple(blocks) if blocks else (rank,)
        # float64 accumulation: the torch path
        if stats.t.dtype != torch.float32:
            return self._reference.pass_chunk(
                chunk,
                factors.f64,
                g,
                a_rows,
                stats,
                dims=dims,
                update=update,
                sweeps=sweeps,
                want_norm=want_norm,
            )
        x = chunk.to(self.device, non_blocking=True).contiguous()
        if x.dtype == torch.float64:
            x = x.to(torch.float32)
        rows, width = x.shape
        norm2: float | torch.Tensor = 0.0
        if want_norm:
            norm2 = self._sum_squares(x)
        kr, inv_kr_scale = self._khatri_rao(factors, x.dtype)
        half = x.dtype != torch.float32
        m = mm_f32(x, kr)
        g = g.to(self.device, torch.float64).contiguous()
        if update == ALS:
            # one float64 GEMM beats the one-thread-per-row kernel here (benchmarks/bench_gpu.py)
            m64 = m.view(rows, -1, rank).sum(dim=1, dtype=torch.float64) * inv_kr_scale
            a_rows.copy_(m64 @ g)
        else:  # every model's rows from its own block of G, one launch
            self.update_rows(m, inv_kr_scale, g, a_rows, widths, hals=True, sweeps=sweeps)
        a64 = a_rows.to(torch.float64)
        stats.ata.addmm_(a64.T, a64)
        if half:
            scale = _pow2_scale(a_rows.abs().amax(dim=0))
            terms = SPLIT_TERMS[x.dtype]
            a2 = torch.empty((rows, terms * rank), dtype=x.dtype, device=self.device)
            self._split_rows(a_rows, scale, a2)
            p = mm_f32(a2.T, x)
            self._add_split(p, 1.0 / scale, stats.t)
        else:
            stats.t.addmm_(a_rows.T, x)
        stats.rows += rows
        return norm2

    def hals_update(
        self,
        f: torch.Tensor,
        m: torch.Tensor,
        g: torch.Tensor,
        sweeps: int,
        blocks: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        rank = f.shape[1]
        out = f.contiguous().clone()
        ones = torch.ones(rank, dtype=torch.float64, device=self.device)
        widths = tuple(blocks) if blocks else (rank,)
        self.update_rows(
            m.contiguous(), ones, g.contiguous(), out, widths, hals=True, sweeps=sweeps
        )
        return out

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
