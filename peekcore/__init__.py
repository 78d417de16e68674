"""peekcore: streaming CP and nonnegative CP of neural-network activations.

Fit a CP model to an activation tensor (samples x channels x space) without
holding it whole: ``peekcore.cp_als(data, rank)`` / ``peekcore.ncp_hals``; sweep
ranks with diagnostics: ``peekcore.rank_sweep``; capture a model's layers:
``peekcore.capture``; rank measures across checkpoints against their quality:
``peekcore.rank_profile``; pictures and reports: ``peekcore.report``.
"""

from __future__ import annotations

from . import datasets, diagnostics, kernels, sources
from ._native import available as _native_available
from ._version import __version__
from .capture import ModelSource, capture
from .edits import edited_outputs
from .estimator import CP
from .importance import ComponentImportance, component_importance
from .model import CPModel, FitHistory
from .solvers import cp_als, ncp_hals
from .solvers.engine import IterationInfo
from .sources import ArraySource, ChunkSource
from .store import ActivationStore
from .sweep import RankSweep, rank_sweep

__all__ = [
    "ActivationStore",
    "CP",
    "ArraySource",
    "CPModel",
    "ChunkSource",
    "ComponentImportance",
    "FitHistory",
    "IterationInfo",
    "ModelSource",
    "RankProfile",
    "RankSweep",
    "__version__",
    "build_info",
    "capture",
    "component_importance",
    "cp_als",
    "datasets",
    "diagnostics",
    "edited_outputs",
    "kernels",
    "ncp_hals",
    "rank_profile",
    "rank_sweep",
    "sources",
]


def build_info() -> dict:
    """What was compiled in: native extension, OpenMP, BLAS, CUDA, versions.

    Returns
    -------
    dict
        ``native`` (bool), and when built: ``openmp``, ``openmp_version``,
        ``max_threads``, ``blas``, ``cpu_kernels`` (``"avx512"`` where the CPU
        pass runs its own AVX-512 kernels for float32, ``"blas"`` where it
        uses OpenBLAS only; ``PEEKCORE_CPU_KERNELS=blas`` forces the
        latter), ``cuda``, ``compiler``, ``cxx_standard``,
        ``pybind11``; plus ``peekcore``, ``torch``, ``numpy`` versions and
        ``cupy`` (version or None).
    """
    import numpy
    import torch

    from . import _native

    info: dict = {"peekcore": __version__, "torch": torch.__version__, "numpy": numpy.__version__}
    info["native"] = _native_available()
    if info["native"]:
        info.update(_native.core().build_info())
    try:
        import cupy  # noqa: F401

        info["cupy"] = cupy.__version__
    except Exception:
        info["cupy"] = None
    return info


def __getattr__(name: str) -> object:
    # peekcore.report brings matplotlib and peekcore.profile scipy.stats: imported on
    # first use, not with peekcore
    import importlib

    if name == "report":
        return importlib.import_module(".report", __name__)
    if name in ("rank_profile", "RankProfile"):  # scipy.stats on first use, not with peekcore
        return getattr(importlib.import_module(".profile.profile", __name__), name)
    raise AttributeError(f"module 'peekcore' has no attribute {name!r}")
