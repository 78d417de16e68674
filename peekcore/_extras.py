"""Optional dependencies: import them, or say which ``pip install`` line brings them.

peekcore's extras (``pyproject.toml``): ``vision`` (torchvision, for folders of
images), ``report`` (matplotlib, for figures and reports), ``demo``
(scikit-learn's digits, and what the demo's report needs), ``gpu`` (CuPy).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import MissingDependencyError

__all__ = ["require"]


def require(module: str, extra: str, what: str, package: str | None = None) -> Any:
    """Import an optional dependency, or say which pip line installs it.

    Parameters
    ----------
    module : str
        The module to import (``"torchvision"``).
    extra : str
        peekcore's extra that installs it (``"vision"``).
    what : str
        What needs it, for the message (``"reading a folder of images"``).
    package : str, optional
        The name pip installs it by, where it differs from the module's
        (``"scikit-learn"`` for ``sklearn.datasets``).

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    ImportError
        When the module is missing; the message names ``pip install "peekcore[extra]"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = package or module.split(".")[0]
        raise MissingDependencyError(
            f"{what} needs {package}, which is not installed: "
            f'pip install "peekcore[{extra}]" (or pip install {package})'
        ) from err
