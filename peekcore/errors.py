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
    "OutputPathError",
    "MissingFolderError",
    "CheckpointError",
    "CheckpointMismatchError",
    "StoreError",
    "StoreDamageError",
    "ConcurrentWriteError",
    "NumericalError",
    "FileFormatError",
    "MissingInputError",
    "OutputExistsError",
    "UnknownNameError",
    "OutOfRangeError",
    "NotFittedError",
    "CaptureError",
    "RuntimeEnvironmentError",
    "InternalError",
    "MissingDependencyError",
    "UnsupportedOptionError",
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


class OutputPathError(PeekcoreError, OSError):
    """An output cannot be written where asked: a folder, FIFO or device in the way, a
    missing or read-only folder. Raised before any work, so nothing computed is lost."""


class MissingFolderError(OutputPathError, FileNotFoundError):
    """The folder an output would go to does not exist."""


class CheckpointError(PeekcoreError, ValueError):
    """A file given to ``resume=`` is not a readable peekcore checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was written for other data or settings that change the numbers.

    Attributes
    ----------
    differences : dict
        ``{name: (in the checkpoint, in this fit)}`` for each thing that differs.
    """

    def __init__(self, message: str, differences: dict | None = None) -> None:
        super().__init__(message)
        self.differences = dict(differences or {})

    def __reduce__(self) -> tuple:  # pickled whole (across processes), not just the message
        return type(self), (str(self), self.differences)


class StoreError(PeekcoreError, ValueError):
    """An activation store is incomplete, corrupt or inconsistent (the message says how)."""


class StoreDamageError(StoreError):
    """A store's files disagree with what it recorded: a chunk file corrupt, truncated,
    moved or swapped, or metadata missing or edited. Capturing it again is the fix."""


class ConcurrentWriteError(PeekcoreError, OSError):
    """Another process is writing the store or checkpoint this call would write.

    Refused at once, before any work: two writers of one store or checkpoint
    would overwrite each other's chunks or states.

    Attributes
    ----------
    path : str
        The store or checkpoint.
    pid : int or None
        The process that writes it, as it recorded itself (None when it had not yet).
    host : str or None
        The machine that process runs on.
    """

    def __init__(
        self, message: str, path: str, pid: int | None = None, host: str | None = None
    ) -> None:
        super().__init__(message)
        self.path, self.pid, self.host = path, pid, host

    def __reduce__(self) -> tuple:  # as BaseException pickles only the message
        return type(self), (str(self), self.path, self.pid, self.host)


class NumericalError(PeekcoreError, FloatingPointError):
    """A fit's numbers left what the compute dtype holds (overflow, a failed solve)."""


class FileFormatError(PeekcoreError, ValueError):
    """A file is not the peekcore file asked for: another format, another kind of
    peekcore file, or one that is damaged or cut short (the message says which)."""


class MissingInputError(PeekcoreError, FileNotFoundError):
    """A file, folder, store or checkpoint given as input does not exist."""


class OutputExistsError(OutputPathError, FileExistsError):
    """An output path is taken by something peekcore will not replace."""


class UnknownNameError(PeekcoreError, KeyError):
    """A name (a layer, a rank of a sweep, a measure) is not among those available."""


class OutOfRangeError(PeekcoreError, IndexError):
    """An index (rows, samples) lies outside what the object holds."""


class NotFittedError(PeekcoreError, ValueError, AttributeError):
    """An estimator is used before ``fit``; like scikit-learn's ``NotFittedError``
    it is both a ``ValueError`` and an ``AttributeError``."""


class CaptureError(PeekcoreError, RuntimeError):
    """Capturing activations failed while the model ran: a layer not called or
    called twice, outputs that change between passes, a data loader that yields
    more or fewer samples than it declares, or a failed store write."""


class RuntimeEnvironmentError(PeekcoreError, RuntimeError):
    """The running environment lacks what a call needs (a process group for
    ``distributed=True``, a lock file that stays put)."""


class InternalError(PeekcoreError, RuntimeError):
    """An internal invariant broke (e.g. chunks handed to a store writer out of
    order): a bug in peekcore or in code driving its low-level writers."""


class MissingDependencyError(PeekcoreError, ImportError):
    """An optional package (or peekcore's compiled extension) that a call needs is
    not installed or was built without the feature; the message says what to install."""


class UnsupportedOptionError(PeekcoreError, NotImplementedError):
    """An option of a drop-in API (``peekcore.tensorly``) that peekcore does not implement."""
