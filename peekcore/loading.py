"""Loading what a user names: Python objects by import spec, and torch model files.

Two spec forms name an object, both resolved from the current folder as
``python -m`` would (the installed ``peek`` script starts in its own ``bin/``
folder, so the current folder is put on ``sys.path`` here):

- ``package.module:attribute`` (``mymodels:SmallCNN``, ``mypkg.nets:make_net``);
- ``path/to/file.py:attribute`` (the file is run as a module; its folder is
  importable, so it can import its neighbours).

Model files written by ``torch.save`` load with ``weights_only=True``: a state
dict (tensors only) is safe to read, while a whole pickled model can run any
code while it loads, so it is read only when the caller says it trusts the file
(``trust=True``, ``peek capture --trust-model-file``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pickle
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ._extras import require
from ._io import file_head
from .errors import InvalidArgumentError, InvalidTypeError, MissingInputError, UnsafeFileError

__all__ = [
    "MODEL_FILE_SUFFIXES",
    "import_object",
    "load_checkpoint",
    "load_inputs",
    "load_model",
    "require",
]

#: Suffixes taken as ``torch.save`` files when no ``:attribute`` is given.
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

#: The command-line flag that opts in to pickled model files, named in errors.
TRUST_FLAG = "--trust-model-file"

_SPEC_HINT = (
    "give module:attribute (e.g. mymodels:SmallCNN, with mymodels.py in the current folder "
    "or an installed package) or path/to/file.py:attribute"
)


def _current_folder_importable() -> None:
    """Put the current folder first on ``sys.path``, as ``python -m`` does."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _import_file(path: Path) -> Any:
    """Run a ``.py`` file as a module (registered, so pickling and dataclasses work)."""
    path = path.resolve()
    # one module name per file, stable across calls, that cannot clash with a real package
    name = f"_peek_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.parent)
    if folder not in sys.path:  # its neighbours import as they would for `python file.py`
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InvalidArgumentError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_object(spec: str) -> Any:
    """The object named by ``"pkg.mod:attr"`` or ``"path/to/file.py:attr"``.

    The current folder is importable (as under ``python -m``), and a file's own
    folder is importable while it runs. ``attr`` may be dotted (``mod:Outer.make``).

    Parameters
    ----------
    spec : str
        ``module:attribute`` or ``file.py:attribute``.

    Returns
    -------
    object
        The attribute.

    Raises
    ------
    InvalidArgumentError
        A spec without ``:attribute``, a missing module, file or attribute; the
        message says which part was not found and how to write a spec.
    """
    if not isinstance(spec, str):
        raise InvalidTypeError(f"an import spec is a string, not {type(spec).__name__}")
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise InvalidArgumentError(f"{spec!r} is not an import spec: {_SPEC_HINT}")
    _current_folder_importable()
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise InvalidArgumentError(
                f"cannot import {spec!r}: no such file {path} (from {os.getcwd()})"
            )
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            if err.name is not None and where.split(".")[0] != err.name.split(".")[0]:
                raise  # the user's module was found but imports something missing
            raise InvalidArgumentError(
                f"cannot import {spec!r}: no module named {where!r} in the current folder "
                f"({os.getcwd()}) or among installed packages; {_SPEC_HINT}"
            ) from err
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = sorted(n for n in dir(module) if not n.startswith("_"))
            raise InvalidArgumentError(
                f"cannot import {spec!r}: {where} has no attribute {attr!r} "
                f"(it has {', '.join(names[:12]) or 'no public names'})"
            ) from None
    return obj


def _as_module(obj: Any, spec: str) -> Any:
    """An ``nn.Module`` instance, or a class or factory called with no arguments."""
    import torch

    if not isinstance(obj, torch.nn.Module) and callable(obj):
        try:
            obj = obj()
        except TypeError as err:
            raise InvalidArgumentError(
                f"{spec!r} could not be called with no arguments ({err}): point the spec at "
                "a model instance or at a factory function that takes no arguments"
            ) from err
    if not isinstance(obj, torch.nn.Module):
        raise InvalidTypeError(
            f"{spec!r} gave a {type(obj).__name__}, not a torch.nn.Module: point it at a "
            "model instance, a model class or a factory returning one"
        )
    return obj


def _check_model_file(path: Path) -> None:
    """Refuse files that are plainly not ``torch.save`` output, before unpickling anything."""
    head = file_head(
        path,
        8,
        missing=f"no such model file: {path} (or {_SPEC_HINT})",
        folder=f"{path} is a folder, not a model file; {_SPEC_HINT}",
        error=InvalidArgumentError,
    )
    if head.startswith(b"\x93NUMPY"):
        raise InvalidArgumentError(
            f"{path} is a numpy array, not a model: --model takes module:attribute, "
            "file.py:attribute or a torch.save'd .pt/.pth file; arrays go to --data"
        )
    # torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol byte 0x80)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise InvalidArgumentError(
            f"{path} is not a file written by torch.save (neither a zip archive nor a "
            f"pickle); {_SPEC_HINT}"
        )


def load_checkpoint(
    path: str | os.PathLike,
    builder: Callable[[], Any] | None = None,
    *,
    trust: bool = False,
) -> Any:
    """A model from a ``torch.save`` file.

    Parameters
    ----------
    path : str or path-like
        The file: a state dict (``torch.save(model.state_dict(), path)``, also
        under a ``"state_dict"`` key) or a whole pickled model.
    builder : callable, optional
        Makes the model a state dict is loaded into (a class or a no-argument
        factory). Required for state dicts.
    trust : bool
        Read whole pickled models (``torch.load(weights_only=False)``), which
        can run any code while they load. Only for files you trust.

    Returns
    -------
    torch.nn.Module
        The model, on the CPU.

    Raises
    ------
    UnsafeFileError
        The file holds pickled objects and ``trust`` is False.
    InvalidArgumentError
        Not a ``torch.save`` file, or a state dict without a builder.
    """
    import torch

    path = Path(path)
    _check_model_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust:
            raise UnsafeFileError(
                f"{path} holds pickled Python objects (a whole model, not only its weights); "
                "loading it can run any code the file carries. If you trust where it came "
                f"from, pass {TRUST_FLAG} (trust=True in Python); otherwise save a state "
                "dict (torch.save(model.state_dict(), path)) and load it into the model's "
                "class"
            ) from err
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, Mapping):
        state = obj.get("state_dict", obj)
        if builder is None:
            raise InvalidArgumentError(
                f"{path} holds a state dict (weights only): peekcore needs the model's code "
                "to load it into; in Python, load_checkpoint(path, builder=MyModel); on the "
                f"command line, --model module:MyModel --weights {path}. A file holding a "
                f"whole pickled model loads with {TRUST_FLAG} instead"
            )
        model = _as_module(builder, getattr(builder, "__qualname__", repr(builder)))
        model.load_state_dict(state)
        return model
    raise InvalidTypeError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")


def load_model(spec: str, *, trust: bool = False, weights: str | None = None) -> Any:
    """The model named by ``spec``.

    Parameters
    ----------
    spec : str
        ``module:attribute`` or ``file.py:attribute`` (a model instance, or a
        class or factory called with no arguments), or a ``torch.save`` file
        (``.pt``, ``.pth``, ...; see :func:`load_checkpoint`).
    trust : bool
        Allow whole pickled model files, which can run any code as they load.
    weights : str, optional
        A state-dict file loaded into the model ``spec`` builds.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    InvalidArgumentError, UnsafeFileError, FileNotFoundError
        With a message that says what to give instead.
    """
    path = Path(spec)
    is_file = path.suffix.lower() in MODEL_FILE_SUFFIXES or (":" not in spec and path.exists())
    if is_file or path.suffix.lower() == ".npy":
        if weights is not None:
            raise InvalidArgumentError(
                "--weights loads a state dict into the model --model builds: give --model "
                "as module:attribute or file.py:attribute"
            )
        return load_checkpoint(path, trust=trust)
    if ":" not in spec:
        raise InvalidArgumentError(f"--model {spec!r}: no such file, and not {_SPEC_HINT}")
    obj = import_object(spec)
    if weights is not None:
        return load_checkpoint(weights, builder=obj, trust=trust)
    return _as_module(obj, spec)


def _first_conv_channels(model: Any) -> int | None:
    """Input channels of the model's first 2-D convolution (None without one)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return int(module.in_channels)
    return None


def load_inputs(spec: str, model: Any = None) -> tuple[Any, list[str]]:
    """The data a ``--data`` argument names, and notes on what was done to it.

    Parameters
    ----------
    spec : str
        ``"digits"`` (scikit-learn's digits), a ``.npy`` file (``N x ...``, read
        lazily) or a folder of images in class subfolders (needs torchvision).
    model : torch.nn.Module, optional
        The model the data will go through. An ``N x H x W`` array of grey
        images given to a model whose first 2-D convolution takes one channel
        gets a channel axis (``N x 1 x H x W``); a note says so.

    Returns
    -------
    data : Dataset or str
        What :func:`peekcore.capture` takes.
    notes : list of str
        Changes made to the data, for the user to read.
    """
    from . import datasets
    from .npyfile import NpyArray, map_npy, read_npy_header

    if spec == "digits":
        return datasets.digits(), []
    path = Path(spec)
    if not path.exists():
        raise MissingInputError(f"no such data: {path} (use 'digits', an .npy file or a folder)")
    if path.is_dir():
        return datasets.image_folder(path), []
    if path.suffix != ".npy":
        raise InvalidArgumentError(
            f"--data {path}: give 'digits', an .npy file (N x C x H x W, or N x H x W for grey "
            "images) or a folder of images in class subfolders"
        )
    shape, fortran, _, _ = read_npy_header(path)
    if len(shape) == 3 and model is not None and _first_conv_channels(model) == 1:
        n, h, w = shape
        # read by rows, not mapped (a file that shrinks meanwhile: an error, not SIGBUS)
        array = map_npy(path)[:, None] if fortran else NpyArray(path, row_shape=(1, h, w))
        note = (
            f"{path.name} holds {n} x {h} x {w} grey images; the model's first convolution "
            f"takes 1 channel, so they are read as {n} x 1 x {h} x {w}"
        )
        name = f"{path.name} (npy, {n} x {h} x {w} read as {n} x 1 x {h} x {w})"
        return datasets.ArrayDataset(array, name=name), [note]
    return str(path), []
