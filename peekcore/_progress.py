"""Whether to show progress bars: one rule for fits, sweeps and captures.

Bars are for a person watching a terminal; written into a log file they are
lines of carriage-return updates. So the default is on only when stderr is a
terminal, and the environment variable ``PEEKCORE_PROGRESS`` overrides that
default for a whole process (a CI job, a test suite, a batch script) without
passing ``progress=`` to every call.

This module imports nothing from peekcore but :mod:`peekcore.errors`.
"""

from __future__ import annotations

import numbers
import os
import sys
from typing import IO, Any

import numpy as np

from .errors import InvalidArgumentError, InvalidTypeError

__all__ = ["ENV_VAR", "resolve_progress"]

ENV_VAR = "PEEKCORE_PROGRESS"
_ENV_VALUES = {"0": False, "1": True}


def _from_environment() -> bool | None:
    """``PEEKCORE_PROGRESS`` as a bool, or None when unset or empty."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if value not in _ENV_VALUES:
        raise InvalidArgumentError(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a valid setting: use {ENV_VAR}=0 "
            f"(no progress bars) or {ENV_VAR}=1 (always show them), or unset it "
            "(bars only when stderr is a terminal)"
        )
    return _ENV_VALUES[value]


def resolve_progress(progress: Any = None, stream: IO | None = None) -> bool:
    """Decide whether a progress bar is shown.

    Parameters
    ----------
    progress : bool or None, optional
        What the caller asked for. ``True`` or ``False`` is obeyed as given;
        ``None`` (the default of every fit and capture) defers to the
        environment and then to the terminal.
    stream : file-like, optional
        Where the bar would be drawn; default :data:`sys.stderr` (tqdm's
        stream), looked up at call time so that a redirected stderr counts.

    Returns
    -------
    bool
        In order: an explicit ``progress``; else ``PEEKCORE_PROGRESS`` when set
        (``0``: no bars, ``1``: bars even into a pipe or log file; an empty
        value counts as unset); else whether ``stream`` is a terminal.

    Raises
    ------
    InvalidArgumentError
        ``PEEKCORE_PROGRESS`` holds anything but ``0``, ``1`` or nothing. It is
        checked even when ``progress`` is given, so that a typo in the
        environment shows up at once rather than on the one call that reads it.
    InvalidTypeError
        ``progress`` is not a bool (or 0 or 1) or None.
    """
    from_env = _from_environment()
    if progress is not None:
        # a bool (NumPy's too) or 0/1; not a string, where "false" would read as True
        if not isinstance(progress, (bool, np.bool_, numbers.Integral)) or progress not in (0, 1):
            raise InvalidTypeError(
                f"progress must be True, False or None (None: decided by {ENV_VAR} or "
                f"whether stderr is a terminal), got {progress!r}"
            )
        return bool(progress)
    if from_env is not None:
        return from_env
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # a closed stream: nothing to draw on
        return False
