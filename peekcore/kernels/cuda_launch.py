"""The custom kernels of the CUDA pass behind one interface, one launcher per backend.

``csrc/cuda/cp_pass.cu`` holds five kernels (see its opening comment):
``sum_squares``, ``khatri_rao``, ``update_rows``, ``split_rows`` and
``add_split``. A launcher exposes them as five methods over torch tensors:

- :class:`TorchLauncher` runs each as torch operations (the same steps and
  rounding): what a GPU machine without CuPy or a CUDA build gets, and what
  runs the CUDA pass on the CPU in tests;
- :class:`CupyLauncher` launches them through a CuPy ``RawModule`` (NVRTC);
- :class:`ExtensionLauncher` launches them through ``peekcore._core`` built
  with ``PEEKCORE_CUDA=ON``.

The two compiled launchers share :class:`_KernelLauncher`, the one place that
computes grid shapes and kernel arguments; each backend only runs a
:class:`Launch`. Template instance names come from ``TEMPLATES`` and the
storage table in :mod:`.storage`. :func:`launch_backend` is the one probe of
what can launch here.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from .. import _native
from ..errors import InvalidArgumentError, MissingDependencyError
from .cuda_loader import cupy_or_error, load_module
from .ops import hals_rows, khatri_rao
from .storage import cuda_type, storage_code

__all__ = [
    "BACKENDS",
    "KERNEL_NAMES",
    "MAX_RANK",
    "TEMPLATES",
    "CupyLauncher",
    "ExtensionLauncher",
    "Launch",
    "Launcher",
    "TorchLauncher",
    "compiled_backends",
    "launch_backend",
    "make_launcher",
    "pow2_scale",
    "split_into",
    "template_name",
]

BACKENDS = ("cupy", "extension", "torch")
# kernel -> (the dtypes it is instantiated for, how many template arguments
# each instance repeats the type in); must match the explicit instantiations
# at the end of cp_pass.cu (checked in tests/test_kernels.py)
TEMPLATES: dict[str, tuple[tuple[torch.dtype, ...], int]] = {
    "sum_squares": ((torch.float16, torch.bfloat16, torch.float32, torch.float64), 1),
    "khatri_rao": ((torch.float32, torch.float16, torch.bfloat16), 1),
    "update_rows": ((torch.float32, torch.float64), 2),
    "split_rows": ((torch.float16, torch.bfloat16), 1),
    "add_split": ((), 0),
}
MAX_RANK = 64  # kMaxRank in csrc/cuda/cp_pass.cu: the widest model update_rows solves
_THREADS = 256
_ROW_THREADS = 128  # update_rows: one thread per row, fewer per block (registers)
_MAX_SUM_BLOCKS = 8 * 1024  # sum_squares strides over the rest
_MAX_ADD_BLOCKS = 1024  # add_split likewise, per row of T


def template_name(kernel: str, dtype: torch.dtype | None = None) -> str:
    """The name expression of a kernel instance, e.g. ``"peekcore::update_rows<float, float>"``."""
    if dtype is None:
        return f"peekcore::{kernel}"
    arity = TEMPLATES[kernel][1]
    return f"peekcore::{kernel}<{', '.join([cuda_type(dtype)] * arity)}>"


KERNEL_NAMES = [
    template_name(k, d) if types else template_name(k)
    for k, (types, _) in TEMPLATES.items()
    for d in (types or (None,))
]


def compiled_backends() -> list[str]:
    """Backends that can launch the compiled kernels here: ``"cupy"`` when CuPy
    imports, ``"extension"`` when peekcore._core was built with CUDA."""
    out = []
    try:
        import cupy  # noqa: F401

        out.append("cupy")
    except ImportError:
        pass
    if _native.available() and hasattr(_native.core(), "cuda_sum_squares"):
        out.append("extension")
    return out


def launch_backend() -> str:
    """How the custom kernels run: ``"cupy"``, ``"extension"`` or ``"torch"``.

    ``PEEKCORE_CUDA_BACKEND`` picks one; by default CuPy when it imports, else
    the extension when it has CUDA, else torch (the same steps as torch
    operations).
    """
    wanted = os.environ.get("PEEKCORE_CUDA_BACKEND", "")
    have = compiled_backends()
    if wanted == "torch":
        return "torch"
    if wanted == "extension" and "extension" not in have:
        raise MissingDependencyError(
            "PEEKCORE_CUDA_BACKEND=extension, but peekcore._core was built without CUDA: "
            "reinstall with PEEKCORE_CUDA=1 pip install . (needs the CUDA toolkit)"
        )
    if wanted in have:
        return wanted
    if wanted == "cupy":
        return "cupy"  # CupyLauncher raises the ImportError that says how to install it
    return have[0] if have else "torch"


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-column powers of two that bring the largest magnitude to (0.5, 1]."""
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    return torch.exp2(-torch.ceil(torch.log2(safe)))


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


class Launcher(ABC):
    """The five custom kernels of the CUDA pass on one device (see the module docstring)."""

    #: backend name, one of ``BACKENDS``
    name: str = "abstract"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def sum_squares(self, x: torch.Tensor) -> torch.Tensor:
        """``||x||^2`` as a 0-d float64 tensor (no host synchronization)."""

    @abstractmethod
    def khatri_rao(
        self, fs: list[torch.Tensor], scale: torch.Tensor, terms: int, out: torch.Tensor
    ) -> None:
        """``out`` (``J x terms*R``) = the terms of ``KR(fs) * scale`` (``fs`` float64)."""

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
        """Rows of ``a`` (``rows x R``) from their MTTKRP ``m``, in place.

        ``a`` holds models of ``widths`` side by side; each uses only its
        diagonal block of ``g`` (``R x R`` float64: ``G^-1`` for ALS, ``G`` for
        HALS, whose sweeps start from the old rows). ``m`` is ``rows x
        terms*R``: the terms are summed, times ``inv_scale`` (``R``).
        """
        self._update_rows(m, inv_scale, g, a, widths, hals, sweeps)

    @abstractmethod
    def _update_rows(self, m, inv_scale, g, a, widths, hals: bool, sweeps: int) -> None:
        """``update_rows`` with its keywords passed by position."""

    @abstractmethod
    def split_rows(self, a: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` (``rows x terms*R``, half) = the terms of ``a * scale`` (``a`` float32)."""

    @abstractmethod
    def add_split(self, p: torch.Tensor, inv_scale: torch.Tensor, t: torch.Tensor) -> None:
        """``t`` (``R x J`` float32) += (sum of the terms of ``p``) * ``inv_scale`` per row."""


class TorchLauncher(Launcher):
    """Each kernel as torch operations, on any device."""

    name = "torch"

    def sum_squares(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((), dtype=torch.float64, device=self.device)
        flat = x.reshape(-1)
        step = 1 << 24  # float64 copies of this many values at a time
        for i in range(0, flat.numel(), step):
            out += torch.sum(flat[i : i + step].to(torch.float64) ** 2)
        return out

    def khatri_rao(
        self, fs: list[torch.Tensor], scale: torch.Tensor, terms: int, out: torch.Tensor
    ) -> None:
        split_into(khatri_rao(fs) * scale, out)

    def _update_rows(self, m, inv_scale, g, a, widths, hals: bool, sweeps: int) -> None:
        rank = a.shape[1]
        terms = m.shape[1] // rank
        lo = 0
        for w in widths:  # model by model, each from its own block of g
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

    def split_rows(self, a: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        split_into(a.to(torch.float64) * scale.to(torch.float64), out)

    def add_split(self, p: torch.Tensor, inv_scale: torch.Tensor, t: torch.Tensor) -> None:
        rank, width = t.shape
        t += p.view(p.shape[0] // rank, rank, width).sum(dim=0) * inv_scale[:, None]


def _i32(v) -> np.int32:
    """Kernel ``int`` argument (CuPy passes numpy scalars by their exact width)."""
    return np.int32(v)


def _i64(v) -> np.int64:
    """Kernel ``long long`` argument."""
    return np.int64(v)


def _blocks(n: int, threads: int = _THREADS) -> int:
    return max(1, math.ceil(n / threads))


@dataclass(frozen=True)
class Launch:
    """One kernel launch, whatever runs it.

    Attributes
    ----------
    kernel : str
        Kernel name in ``TEMPLATES``.
    dtype : torch.dtype or None
        The type its template is instantiated for (None: not a template).
    grid : tuple of int
        ``(x, y)`` blocks.
    block : int
        Threads per block.
    args : tuple
        The kernel's arguments in order: tensors (device pointers) and numpy
        integers of the kernel's widths.
    shared : int
        Dynamic shared memory in bytes.
    """

    kernel: str
    dtype: torch.dtype | None
    grid: tuple[int, int]
    block: int
    args: tuple
    shared: int = 0

    @property
    def name(self) -> str:
        """The template instance, e.g. ``"peekcore::sum_squares<__half>"``."""
        return template_name(self.kernel, self.dtype)


class _KernelLauncher(Launcher):
    """The compiled kernels: grid shapes and arguments here, running in subclasses."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self._torch = TorchLauncher(device)  # update_rows beyond the kernel's limits
        self._tables: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._offset_tables: dict[tuple[int, ...], torch.Tensor] = {}

    @abstractmethod
    def run(self, launch: Launch) -> None:
        """Launch on torch's current stream of the device."""

    def sum_squares(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((), dtype=torch.float64, device=self.device)
        n = x.numel()
        grid = (min(_blocks(n), _MAX_SUM_BLOCKS), 1)
        self.run(Launch("sum_squares", x.dtype, grid, _THREADS, (x, _i64(n), out)))
        return out

    def khatri_rao(
        self, fs: list[torch.Tensor], scale: torch.Tensor, terms: int, out: torch.Tensor
    ) -> None:
        rank, width = fs[0].shape[1], out.shape[0]
        ptrs, dims = self._factor_table(fs)
        args = (ptrs, dims, _i32(len(fs)), _i32(rank), _i64(width), scale, _i32(terms), out)
        self.run(Launch("khatri_rao", out.dtype, (_blocks(width * rank), 1), _THREADS, args))

    def _update_rows(self, m, inv_scale, g, a, widths, hals: bool, sweeps: int) -> None:
        # the kernel takes a and m both float32 or both float64, models up to
        # MAX_RANK wide; anything else runs as torch operations
        if not (
            max(widths) <= MAX_RANK
            and a.dtype == m.dtype
            and a.dtype in TEMPLATES["update_rows"][0]
        ):
            self._torch.update_rows(m, inv_scale, g, a, widths, hals=hals, sweeps=sweeps)
            return
        rank, rows = a.shape[1], a.shape[0]
        args = (
            m,
            _i32(m.shape[1]),
            inv_scale,
            g,
            self._offsets(widths),
            _i32(rank),
            _i64(rows),
            _i32(int(hals)),
            _i32(sweeps),
            a,
        )
        grid = (_blocks(rows, _ROW_THREADS), len(widths))
        shared = 8 * max(widths) ** 2  # the widest model's block of g, float64
        self.run(Launch("update_rows", a.dtype, grid, _ROW_THREADS, args, shared))

    def split_rows(self, a: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        rank, rows = a.shape[1], a.shape[0]
        args = (a, scale, _i32(rank), _i64(rows), _i32(out.shape[1] // rank), out)
        self.run(Launch("split_rows", out.dtype, (_blocks(rows * rank), 1), _THREADS, args))

    def add_split(self, p: torch.Tensor, inv_scale: torch.Tensor, t: torch.Tensor) -> None:
        rank, width = t.shape
        args = (p, inv_scale, _i32(rank), _i64(width), _i32(p.shape[0] // rank), t)
        grid = (min(_blocks(width), _MAX_ADD_BLOCKS), rank)  # y over the rows of T
        self.run(Launch("add_split", None, grid, _THREADS, args))

    def _offsets(self, widths: tuple[int, ...]) -> torch.Tensor:
        """Device int32 column offsets of models of ``widths`` side by side (cached)."""
        if widths not in self._offset_tables:
            bounds = [0, *itertools.accumulate(widths)]
            table = torch.tensor(bounds, dtype=torch.int32, device=self.device)
            self._offset_tables[widths] = table
        return self._offset_tables[widths]

    def _factor_table(self, fs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
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


class CupyLauncher(_KernelLauncher):
    """Launches through a CuPy ``RawModule`` of ``cp_pass.cu`` (compiled once per device)."""

    name = "cupy"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.cupy = cupy_or_error()
        with self.cupy.cuda.Device(device.index):
            self.module = load_module("cp_pass", KERNEL_NAMES)
        self._streams: dict[int, object] = {}

    def _stream(self, stream: torch.cuda.Stream):
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

    def run(self, launch: Launch) -> None:
        cp = self.cupy
        # zero-copy through __cuda_array_interface__; CuPy has no bfloat16, and
        # kernels take raw pointers, so bfloat16 travels as its int16 bits
        args = tuple(
            cp.asarray(a.view(torch.int16) if a.dtype == torch.bfloat16 else a)
            if isinstance(a, torch.Tensor)
            else a
            for a in launch.args
        )
        stream = torch.cuda.current_stream(self.device)
        with cp.cuda.Device(self.device.index), self._stream(stream):
            fn = self.module.get_function(launch.name)
            fn(launch.grid, (launch.block,), args, shared_mem=launch.shared)


class ExtensionLauncher(_KernelLauncher):
    """Launches through ``peekcore._core.cuda_<kernel>`` (an extension built with CUDA).

    Each entry takes the storage code of the template type (templates only),
    the kernel's arguments (tensors as device addresses), then the grid, block,
    shared bytes and stream (see ``csrc/cuda/launch.h``).
    """

    name = "extension"

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.core = _native.core()

    def run(self, launch: Launch) -> None:
        entry = getattr(self.core, f"cuda_{launch.kernel}")
        code = () if launch.dtype is None else (storage_code(launch.dtype),)
        args = [a.data_ptr() if isinstance(a, torch.Tensor) else int(a) for a in launch.args]
        stream = torch.cuda.current_stream(self.device).cuda_stream
        entry(*code, *args, *launch.grid, launch.block, launch.shared, stream)


def make_launcher(backend: str, device: torch.device) -> Launcher:
    """The launcher of ``backend`` (one of ``BACKENDS``) on ``device``."""
    kinds = {"torch": TorchLauncher, "cupy": CupyLauncher, "extension": ExtensionLauncher}
    if backend not in kinds:
        raise InvalidArgumentError(
            f"backend must be 'cupy', 'extension' or 'torch', got {backend!r}"
        )
    return kinds[backend](device)
