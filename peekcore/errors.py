"""Typed errors of peekcore: one hierarchy under :class:`PeekcoreError`.

Each class also subclasses the builtin error a caller would expect
(``ValueError``, ``TypeError``, ``OSError``), so code written as
``except ValueError`` keeps working, while code that needs to tell peekcore's
refusals apart catches the typed class instead of matching message text.
"""

from __future__ import annotations

__all__ = [
    "PeekcoreError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "DataError",
    "UnsafeFileError",
]


class PeekcoreError(Exception):
    """Base of every error peekcore raises on purpose."""


class InvalidArgumentError(PeekcoreError, ValueError):
    """An argument has the right type but a value peekcore cannot use (a rank of 0, ...)."""


class InvalidTypeError(PeekcoreError, TypeError):
    """An argument has a type peekcore cannot use (a float rank, integer data, ...)."""


class DataError(PeekcoreError, ValueError):
    """The data itself is unusable (NaN or Inf, negative values for a nonnegative fit, ...)."""


class UnsafeFileError(PeekcoreError, ValueError):
    """A file would have to run code to load (a pickled model) and the caller did not opt in."""
