"""Loads the compiled extension ``peekcore._core`` (optional at import time)."""

from __future__ import annotations

from types import ModuleType

from .errors import MissingDependencyError

_core: ModuleType | None = None
_error: BaseException | None = None

try:
    # Loads libscipy_openblas into the global namespace first, so _core's
    # dependency on it resolves from the installed package, not a build path.
    import scipy_openblas32  # noqa: F401

    from . import _core  # type: ignore[attr-defined,no-redef]
except ImportError as err:  # pragma: no cover - exercised when the build is missing
    _core = None
    _error = err


def core() -> ModuleType:
    """The compiled extension, or an ImportError that says how to build it."""
    if _core is None:
        raise MissingDependencyError(
            "peekcore's native extension (peekcore._core) is not built: install the package "
            "with `pip install .` (or `pip install -e .` in a checkout), which compiles it with "
            f"CMake and a C++17 compiler. Original error: {_error}"
        ) from _error
    return _core


def available() -> bool:
    """Whether the compiled extension imported."""
    return _core is not None
