"""Per-chunk pass kernels: one contract (``base``), several implementations."""

from __future__ import annotations

import torch

from .. import _native
from ..errors import InvalidArgumentError
from .base import ALS, HALS, PassKernel, PassStatistics
from .cuda_launch import compiled_backends
from .reference import TorchKernel

__all__ = [
    "ALS",
    "HALS",
    "PassKernel",
    "PassStatistics",
    "TorchKernel",
    "cuda_available",
    "cuda_kernels_available",
    "get_kernel",
    "names",
]


def cuda_available() -> bool:
    """Whether the ``"cuda"`` kernel can run: a CUDA device.

    Its custom kernels need CuPy or an extension built with CUDA
    (``PEEKCORE_CUDA=1 pip install .``, see :func:`cuda_kernels_available`);
    without either it runs the same pass with torch operations.
    """
    return torch.cuda.is_available()


def cuda_kernels_available() -> bool:
    """Whether the ``"cuda"`` kernel has its custom kernels: a CUDA device, and CuPy or
    an extension built with CUDA."""
    return torch.cuda.is_available() and bool(compiled_backends())


def names() -> list[str]:
    """Kernel names usable on this machine."""
    out = ["torch"]
    if _native.available():
        out.append("native")
    if cuda_available():
        out.append("cuda")
    return out


def get_kernel(kernel: str | PassKernel | None, device: str | torch.device) -> PassKernel:
    """Choose the pass kernel for a device.

    Parameters
    ----------
    kernel : {"native", "torch", "cuda"}, PassKernel or None
        ``None`` picks the fastest available: the C++ extension on the CPU, the
        CUDA pass on a GPU (its custom kernels through CuPy or the extension,
        else the same steps as torch operations).
    device : str or torch.device
        ``"cpu"`` or a CUDA device.
    """
    if isinstance(kernel, PassKernel):
        return kernel
    dev = torch.device(device)
    if kernel is None:
        if dev.type == "cpu":
            kernel = "native" if _native.available() else "torch"
        else:
            kernel = "cuda" if cuda_available() else "torch"
    if kernel == "torch":
        return TorchKernel(dev)
    if kernel == "native":
        from .native import NativeKernel

        return NativeKernel(dev)
    if kernel == "cuda":
        from .cuda import CudaKernel

        return CudaKernel(dev)
    raise InvalidArgumentError(f"unknown kernel {kernel!r}; choose from {names()}")
