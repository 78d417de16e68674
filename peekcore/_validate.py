"""Checks of user arguments at the bottom of the package: integers, ranks, seeds, dtypes, paths.

One rule for each kind of argument, so that every entry point refuses the same
inputs with the same words (every message says what was wrong and what to give
instead):

* **integers** (ranks, iterations, chunk sizes, replicates, ...): Python or
  NumPy integers. ``bool``, floats (``2.0`` and ``2.5`` alike) and strings are
  refused (``InvalidTypeError``), never rounded or parsed.
* **ranks**: positive integers; a list of them (distinct) for a sweep, or a
  string in the command line's syntax (``"1-8"``, ``"2,4,8"``, ``"1-16:2"``),
  parsed here for both the CLI and :func:`peekcore.rank_sweep`.
* **seeds**: ``None`` (where a function allows it) or a nonnegative integer,
  everywhere: NumPy's generators take no negative seed, and a seed is stored with
  models and checkpoints, so a generator object is refused.
* **dtypes**: data is float16, bfloat16, float32 or float64 (names, NumPy or
  torch dtypes).
* **labels** (of capture inputs): integers (stored as int64) or floats
  (float64); other dtypes are refused.
* **output paths**: a regular file or nothing at the path (a symlink counts as
  its target: outputs are written through it), and an existing, writable folder.
  Checked before any work, so that a long fit is not lost to a typo in ``--out``.

This module imports nothing from peekcore but :mod:`peekcore.errors`.
"""

from __future__ import annotations

import numbers
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InvalidArgumentError, InvalidTypeError, MissingFolderError, OutputPathError

__all__ = [
    "check_device",
    "SUPPORTED_DTYPES",
    "check_int",
    "check_seed",
    "parse_ranks",
    "dtype_label",
    "dtype_name",
    "numeric_labels",
    "output_target",
    "check_output_file",
]

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
DEVICES = "'cpu', 'cuda' or 'cuda:N' (N a GPU index)"  # all that peekcore computes on

# one part of a rank string: "4", "1-8" or "1-16:2"
_RANK_PART = re.compile(r"(\d+)(?:-(\d+)(?::(\d+))?)?")
RANK_SYNTAX = "e.g. 1-8, 2,4,8 or 1-16:2 (positive integers)"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, name: str, *, minimum: int = 1, purpose: str = "") -> int:
    """``value`` as a plain ``int`` of at least ``minimum``, or a clear error.

    Parameters
    ----------
    value : any
    name : str
        The argument's name, for the message.
    minimum : int
        Smallest accepted value (1: positive, 0: nonnegative).
    purpose : str
        What the number counts, for the message (``" (iterations between checkpoints)"``).

    Raises
    ------
    InvalidTypeError
        Not an integer (``bool``, floats and strings included).
    InvalidArgumentError
        Below ``minimum``.
    """
    if minimum == 1:
        kind = "a positive integer"
    elif minimum == 0:
        kind = "a nonnegative integer"
    else:
        kind = f"an integer >= {minimum}"
    if not _is_int(value):
        raise InvalidTypeError(
            f"{name} must be {kind}{purpose}, got {value!r} ({type(value).__name__}); "
            f"give a whole number, e.g. {name}={max(minimum, 1)}"
        )
    if value < minimum:
        raise InvalidArgumentError(
            f"{name} must be {kind}{purpose}, got {value} ({name} must be at least {minimum})"
        )
    return int(value)


def check_seed(value: Any, name: str = "random_state", *, allow_none: bool = True) -> int | None:
    """A seed: ``None`` (if allowed) or a nonnegative integer, as a plain ``int``.

    A seed, not a generator: it is stored in models' metadata and checkpoints,
    and later generators are derived from it.
    """
    if value is None and allow_none:
        return None
    accepted = "None or a nonnegative integer seed" if allow_none else "a nonnegative integer seed"
    if not _is_int(value):
        raise InvalidTypeError(
            f"{name} must be {accepted}, got {value!r} ({type(value).__name__}); a generator "
            f"cannot be stored with a model or its checkpoints: pass an integer, e.g. {name}=0"
        )
    if value < 0:
        raise InvalidArgumentError(f"{name} must be {accepted}, got {value}; e.g. {name}=0")
    return int(value)


def _parse_rank_text(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = _RANK_PART.fullmatch(part)
        if not m:
            raise InvalidArgumentError(f"bad rank range {text!r}: use {RANK_SYNTAX}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        step = int(m.group(3)) if m.group(3) else 1
        if lo < 1 or hi < lo or step < 1:
            raise InvalidArgumentError(
                f"bad rank range {part!r}: need 1 <= first <= last and step >= 1 ({RANK_SYNTAX})"
            )
        out.extend(range(lo, hi + 1, step))
    return sorted(set(out))


def parse_ranks(value: Any) -> list[int]:
    """Candidate ranks from a string (CLI syntax), one integer, or a sequence of integers.

    A string is parsed as ``peek sweep --ranks`` parses it (``"1-8"``,
    ``"2,4,8"``, ``"1-16:2"``; sorted, repeats merged). A sequence must hold
    distinct positive integers; its order is kept. Floats and strings inside a
    sequence are refused, never rounded or parsed.

    Raises
    ------
    InvalidTypeError, InvalidArgumentError
    """
    if isinstance(value, str):
        return _parse_rank_text(value)
    if _is_int(value):
        return [check_int(value, "rank", purpose=" (a number of components)")]
    if isinstance(value, (bytes, dict, set, frozenset)) or not hasattr(value, "__iter__"):
        raise InvalidTypeError(
            f"ranks must be a sequence of positive integers or a string like '1-8', got "
            f"{value!r} ({type(value).__name__})"
        )
    items = list(value.tolist() if isinstance(value, np.ndarray) else value)
    if not items:
        raise InvalidArgumentError("ranks is empty: give at least one rank, e.g. range(1, 9)")
    ranks = [check_int(r, "rank", purpose=" (a number of components)") for r in items]
    if len(set(ranks)) != len(ranks):
        raise InvalidArgumentError(f"ranks must be distinct, got {ranks}")
    return ranks


def dtype_label(dtype: Any) -> str:
    """The plain name of a numpy / torch / string dtype (``"float16"``, ``"int32"``, ...)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def dtype_name(dtype: Any) -> str:
    """Name of a numpy / torch / string dtype as one of ``SUPPORTED_DTYPES``.

    Raises
    ------
    InvalidTypeError
        For integer, boolean, complex or unknown dtypes, with the fix.
    """
    name = dtype_label(dtype)
    if name in SUPPORTED_DTYPES:
        return name
    raise InvalidTypeError(
        f"peekcore factors floating-point data (float16, bfloat16, float32 or float64); "
        f"got dtype {name}. Convert first, e.g. data.astype(np.float32)."
    )


def numeric_labels(y: np.ndarray) -> np.ndarray:
    """Labels as a capture stores them: integers as int64, floats as float64.

    Raises
    ------
    InvalidTypeError
        For any other dtype (strings, objects, complex), with the fix.
    """
    if y.dtype.kind in "biu":
        return y.astype(np.int64, copy=False)
    if y.dtype.kind == "f":
        return y.astype(np.float64, copy=False)
    raise InvalidTypeError(
        f"labels must be numeric (integers or floats), got dtype {y.dtype}; map them to "
        "numbers first, or pass data without labels"
    )


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def output_target(path: str | os.PathLike, what: str = "the output") -> Path:
    """Where a file written to ``path`` lands: the path, or a symlink's final target.

    Refuses a path that is (or whose symlink target is) anything but a regular
    file: replacing a folder, FIFO, device or socket with a file would destroy
    it (``/dev/null`` replaced by a model file, for one).

    Raises
    ------
    OutputPathError
    """
    given = Path(path)
    dest = Path(os.path.realpath(given)) if given.is_symlink() else given
    try:
        mode = os.stat(dest).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the folder is checked apart)
        return dest
    if not stat.S_ISREG(mode):
        via = f" (the target of the symlink {given})" if dest != given else ""
        fix = f"a file inside it, e.g. {dest / given.name}" if stat.S_ISDIR(mode) else "a file"
        raise OutputPathError(
            f"cannot write {what} to {dest}{via}: it is {_kind(mode)}, not a regular file, "
            f"and writing would replace it; give the path of {fix} to create or replace"
        )
    return dest


def check_output_file(
    path: str | os.PathLike, what: str = "the output", *, make_folder: bool = False
) -> Path:
    """Check, before any work, that a file can be written at ``path``; returns its target.

    Parameters
    ----------
    path : path-like
    what : str
        What will be written, for the messages ("checkpoints", "the model", ...).
    make_folder : bool
        The writer creates missing folders: then the nearest existing folder
        above must be writable instead.

    Raises
    ------
    OutputPathError
        The path is a folder, FIFO, device or socket; the folder is not writable,
        or is a file.
    MissingFolderError
        The folder does not exist (and is not to be made).
    """
    dest = output_target(path, what)
    folder = dest.parent
    if make_folder:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if not folder.exists():
        raise MissingFolderError(
            f"cannot write {what} to {path}: folder {folder} does not exist; create it first"
        )
    if not folder.is_dir():
        raise OutputPathError(
            f"cannot write {what} to {path}: {folder} is a file, not a folder; choose another path"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"cannot write {what} to {path}: folder {folder} is not writable; choose another "
            "folder or change its permissions"
        )
    return dest


def check_device(device: Any, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, refused with a clear message when it is not there.

    peekcore computes on the CPU and on CUDA GPUs only: other devices torch
    knows (``meta``, which holds no values, ``mps``, ...) are refused here,
    rather than failing later inside torch. Torch's own error for a CUDA
    device in a CPU build ("Torch not compiled with CUDA enabled") does not
    say what to do; this one does.

    Parameters
    ----------
    device : str, int or torch.device
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (as torch spells them).
    name : str
        What the device is, for the message (e.g. "the model's device").

    Raises
    ------
    InvalidArgumentError
        For a device torch does not know, one peekcore cannot compute on, or a
        CUDA device that is not there.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidArgumentError(
            f"{name} {device!r} is not a device torch knows: use {DEVICES}"
        ) from err
    if dev.type not in ("cpu", "cuda"):
        why = " (meta tensors hold no values)" if dev.type == "meta" else ""
        raise InvalidArgumentError(
            f"{name} {str(dev)!r} is not one peekcore can compute on{why}: use {DEVICES}"
        )
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise InvalidArgumentError(
                f"device {str(dev)!r}: this torch ({torch.__version__}) is a CPU-only build; "
                "install the CUDA build of torch for your driver (pytorch.org) or use device "
                "'cpu'"
            )
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {str(dev)!r}: torch sees no CUDA device (no GPU, no driver, or "
                "CUDA_VISIBLE_DEVICES hides them); use device 'cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"device {str(dev)!r}: there are only {torch.cuda.device_count()} CUDA devices "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    return dev
