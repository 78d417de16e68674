"""Settings shared by capture() and ModelSource: checked once, turned into hooks and inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._options import SharedOptions
from .._validate import check_device, check_seed
from ..datasets import Inputs, as_inputs
from ..errors import InvalidArgumentError, InvalidTypeError
from ..store import check_store_dtype
from .hooks import LayerHooks
from .layouts import _per_layer, resolve_layers

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _model_device(model: nn.Module, device: Any) -> torch.device:
    """Where the model runs: ``device`` (the model moved there) or where its tensors are."""
    if device is not None:
        dev = check_device(device)
        model.to(dev)
        return dev
    for t in (*model.parameters(), *model.buffers()):
        # a model built on "meta" fails here rather than on its first batch
        return check_device(t.device, "the model's device")
    return torch.device("cpu")


def _autocast_dtype(autocast: Any, device: torch.device) -> torch.dtype | None:
    if autocast is None or autocast is False:
        return None
    if autocast is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    name = str(autocast).removeprefix("torch.")
    if name in ("float16", "bfloat16"):
        return _TORCH_DTYPES[name]
    raise InvalidArgumentError(
        f"autocast must be False, True, 'float16' or 'bfloat16'; got {autocast!r}"
    )


@dataclasses.dataclass(frozen=True)
class CaptureOptions(SharedOptions):
    """How a model is run and its layer outputs read: what :func:`~peekcore.capture`
    and :class:`~peekcore.capture.ModelSource` share.

    Each field means what the argument of the same name of
    :func:`peekcore.capture` means; nothing is checked until :meth:`hook`. Both
    take them as ``**options``, shown in their signatures by
    ``CaptureOptions.shown_in`` (:class:`peekcore._options.SharedOptions`).
    """

    dtype: str = "float16"
    batch_size: int = 64
    device: Any = None
    autocast: bool | str | torch.dtype = False
    layout: str | Mapping[str, str] = "auto"
    select: Any = None
    fold_spatial: bool = False
    n_samples: int | None = None
    transform: Callable | None = None
    seed: int | None = 0
    num_workers: int = 0

    def hook(self, model: nn.Module, data: Any, layers: Any) -> Hooked:
        """Check the options, find the layers, device and inputs, and build the hooks.

        Parameters
        ----------
        model : torch.nn.Module
            Moved to ``device`` when one is given.
        data : any form :func:`peekcore.datasets.as_inputs` takes
        layers : str or sequence of str
            Module names (:func:`resolve_layers`).

        Returns
        -------
        Hooked
        """
        if not isinstance(model, nn.Module):
            raise InvalidTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        modules = resolve_layers(model, layers)
        names = list(modules)
        dtype = check_store_dtype(self.dtype)
        seed = check_seed(self.seed, "seed")  # nonnegative, as every seed in peekcore
        device = _model_device(model, self.device)
        inputs = as_inputs(
            data,
            batch_size=self.batch_size,
            n_samples=self.n_samples,
            num_workers=self.num_workers,
            transform=self.transform,
            pin_memory=device.type == "cuda",
        )
        layouts = _per_layer(self.layout, names, "layout")
        selects = _per_layer(self.select, names, "select")
        autocast = _autocast_dtype(self.autocast, device)
        hooks = LayerHooks(
            model,
            modules,
            dtype=_TORCH_DTYPES[dtype],
            layout=layouts,
            select=selects,
            fold_spatial=bool(self.fold_spatial),
            device=device,
            autocast=autocast,
        )
        return Hooked(names, dtype, seed, device, inputs, layouts, selects, autocast, hooks)


@dataclasses.dataclass(frozen=True)
class Hooked:
    """:class:`CaptureOptions` checked and resolved against one model and data set.

    Attributes
    ----------
    names : list of str
        The layers, in the order given.
    dtype : str
        Store dtype of the activations.
    seed : int or None
    device : torch.device
        Where the model runs.
    inputs : peekcore.datasets.Inputs
    layouts, selects : dict of layer -> layout, selector
    autocast : torch.dtype or None
    hooks : LayerHooks
        Not yet entered.
    """

    names: list[str]
    dtype: str
    seed: int | None
    device: torch.device
    inputs: Inputs
    layouts: dict[str, str]
    selects: dict[str, Any]
    autocast: torch.dtype | None
    hooks: LayerHooks
