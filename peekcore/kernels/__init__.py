"""Per-chunk pass kernels: one contract (``base``), several implementations."""

from __future__ import annotations

import torch

from .. import _native
from .base import ALS, HALS, PassKernel, PassStatistics
from .reference import TorchKernel

__all__ = ["ALS", "HALS", "PassKernel", "PassStatistics", "TorchKernel", "get_kernel", "names"]


def names() -> list[str]:
    """Kernel names usable on this machine."""
    out = ["torch"]
    if _native.available():
        out.append("native")
    return out


def get_kernel(kernel: str | PassKernel | None, device: str | torch.device) -> PassKernel:
    """Choose the pass kernel for a device.

    Parameters
    ----------
    kernel : {"native", "torch", "cuda"}, PassKernel or None
        ``None`` picks the fastest available: the C++ extension on the CPU.
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
            kernel = "torch"
    if kernel == "torch":
        return TorchKernel(dev)
    if kernel == "native":
        from .native import NativeKernel

        return NativeKernel(dev)
    raise ValueError(f"unknown kernel {kernel!r}; choose from {names()}")
