"""Load CUDA sources from ``csrc/cuda`` as CuPy ``RawModule`` objects, cached per device.

Each source is prefixed with a ``#line`` directive so that NVRTC errors name
the real file and line, and compiled with ``csrc/include`` on the include path
(shared host/device math). Kernel templates are instantiated by name
expression (``"peekcore::sum_squares<__half>"``), once per device.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError, MissingInputError

__all__ = ["cupy_or_error", "source_root", "load_module"]

_PKG = Path(__file__).resolve().parent.parent
_LOCK = threading.Lock()
_CACHE: dict[tuple[int, str], Any] = {}


def cupy_or_error():
    """Import CuPy, or raise an ImportError that says how to install it."""
    try:
        import cupy
    except ImportError as err:
        raise MissingDependencyError(
            "peekcore's CUDA kernels need CuPy: pip install cupy-cuda12x (CUDA 12) or "
            "cupy-cuda13x (CUDA 13), matching your driver; or pass kernel='torch'"
        ) from err
    return cupy


def source_root() -> Path:
    """Folder holding ``cuda/`` and ``include/``: the checkout's ``csrc`` or the installed copy."""
    for root in (_PKG.parent / "csrc", _PKG / "_csrc"):
        if (root / "cuda").is_dir():
            return root
    raise MissingInputError(
        "peekcore's CUDA sources were not found (looked in csrc/ beside the package and in "
        "peekcore/_csrc); reinstall peekcore"
    )


def load_module(name: str, name_expressions: list[str]) -> Any:
    """Compile (once per device) and return the ``RawModule`` of ``csrc/cuda/<name>.cu``."""
    cupy = cupy_or_error()
    device = cupy.cuda.Device().id
    key = (device, name)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        root = source_root()
        path = root / "cuda" / f"{name}.cu"
        code = f'#line 1 "{path}"\n' + path.read_text()
        module = cupy.RawModule(
            code=code,
            options=("-std=c++17", f"-I{root / 'include'}"),
            name_expressions=list(name_expressions),
        )
        for expr in name_expressions:  # compile now, so errors surface here
            module.get_function(expr)
        _CACHE[key] = module
        return module
