"""The checkpoints of a rank profile: what a caller may pass, loaded safely, and their quality.

A checkpoint is named and gives a model: an ``nn.Module``, or the path of a
file saved with ``torch.save``. Files load through :mod:`peekcore.loading`: a
state dict goes into ``builder()`` with ``torch.load(weights_only=True)``, so
the file cannot run code; a whole pickled model loads only with
``trust=True``. A checkpoint's quality (test accuracy, say) is given with it,
as a list beside the checkpoints, or computed by a callable ``(model) -> float``
such as :func:`accuracy`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._validate import check_device
from ..errors import InvalidArgumentError, InvalidTypeError, MissingInputError

__all__ = ["CheckpointSpec", "accuracy", "checkpoint_specs"]

_KEYS = ("name", "model", "quality", "seed", "condition", "info")


@dataclass
class CheckpointSpec:
    """One checkpoint of a profile, before its model is loaded.

    Attributes
    ----------
    name : str
        Unique among the profile's checkpoints (also names its store).
    model : nn.Module or path
    quality : float or None
        None until computed (``quality=`` callable).
    seed : int or None
        The training seed: points of one seed are not independent, so the
        association tests treat them as a group.
    condition : str
        What the checkpoint is apart from its seed (default its name); the
        spread over seeds is taken across points of one condition.
    info : dict
        Anything else worth keeping with the point (epoch, label noise, ...).
    """

    name: str
    model: Any
    quality: float | None = None
    seed: int | None = None
    condition: str = ""
    info: dict = field(default_factory=dict)


def _one_spec(i: int, item: Any) -> CheckpointSpec:
    if isinstance(item, CheckpointSpec):
        return item
    if isinstance(item, Mapping):
        unknown = sorted(set(item) - set(_KEYS))
        if unknown or "name" not in item or "model" not in item:
            raise InvalidArgumentError(
                f"checkpoint {i}: a dict needs 'name' and 'model' (optional: 'quality', 'seed', "
                f"'condition', 'info'); got keys {sorted(item)}"
            )
        spec = CheckpointSpec(**item)
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        spec = CheckpointSpec(str(item[0]), item[1], item[2] if len(item) == 3 else None)
    else:
        raise InvalidTypeError(
            f"checkpoint {i} is {item!r}: give (name, model or path), (name, model or path, "
            "quality) or a dict with 'name' and 'model'"
        )
    if not isinstance(spec.model, (nn.Module, str, os.PathLike)):
        raise InvalidTypeError(
            f"checkpoint {spec.name!r}: the model must be a torch.nn.Module or the path of a "
            f"torch.save'd file, got {type(spec.model).__name__}"
        )
    if not isinstance(spec.model, nn.Module) and not Path(spec.model).is_file():
        # checked before any checkpoint runs, not when its turn comes
        raise MissingInputError(f"checkpoint {spec.name!r}: no such file {spec.model}")
    spec.name = str(spec.name)
    spec.condition = str(spec.condition or spec.name)
    if spec.seed is not None:
        spec.seed = int(spec.seed)
    return spec


def checkpoint_specs(
    checkpoints: Any, quality: Any
) -> tuple[list[CheckpointSpec], Callable | None]:
    """Checkpoints as :class:`CheckpointSpec` with their qualities, checked.

    Parameters
    ----------
    checkpoints : sequence
        ``(name, model)``, ``(name, model, quality)``, dicts with keys ``name``,
        ``model`` and optionally ``quality``, ``seed``, ``condition``, ``info``,
        or :class:`CheckpointSpec`.
    quality : None, sequence of float or callable
        One value per checkpoint, or ``(model) -> float`` computed per checkpoint.

    Returns
    -------
    specs : list of CheckpointSpec
    quality_fn : callable or None
        The callable to compute qualities with, when one was given.
    """
    if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not isinstance(
        checkpoints, Sequence
    ):
        raise InvalidTypeError(
            "checkpoints must be a list such as [('epoch1', 'e1.pt'), ('epoch8', 'e8.pt')], "
            f"got {type(checkpoints).__name__}"
        )
    specs = [_one_spec(i, item) for i, item in enumerate(checkpoints)]
    if not specs:
        raise InvalidArgumentError("checkpoints is empty: give at least one (name, model) pair")
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidArgumentError(f"checkpoint names must be unique; repeated: {repeated}")
    quality_fn = None
    if callable(quality):
        quality_fn = quality
    elif quality is not None:
        values = list(np.asarray(quality, dtype=np.float64).ravel())
        if len(values) != len(specs):
            raise InvalidArgumentError(
                f"quality has {len(values)} values for {len(specs)} checkpoints: give one each"
            )
        for s, v in zip(specs, values, strict=True):
            s.quality = float(v)
    missing = [s.name for s in specs if s.quality is None]
    if missing and quality_fn is None:
        raise InvalidArgumentError(
            f"no quality for checkpoints {missing}: give each a value ((name, model, quality)), "
            "quality=[...], or quality=peekcore.profile.accuracy(inputs, labels)"
        )
    for s in specs:
        if s.quality is not None and not math.isfinite(s.quality):
            raise InvalidArgumentError(f"checkpoint {s.name!r}: quality {s.quality} is not finite")
    return specs, quality_fn


def load_spec_model(spec: CheckpointSpec, builder: Any, trust: bool) -> nn.Module:
    """The checkpoint's model: as given, or loaded from its file (safely unless ``trust``)."""
    if isinstance(spec.model, nn.Module):
        return spec.model
    from ..loading import load_checkpoint

    return load_checkpoint(Path(spec.model), builder, trust=trust)


def store_stem(name: str) -> str:
    """A file-safe stem for a checkpoint's store (``epoch 8/seed 1`` -> ``epoch_8_seed_1``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "checkpoint"


def accuracy(
    inputs: Any, labels: Any, *, batch_size: int = 256, device: Any = None
) -> Callable[[nn.Module], float]:
    """A quality function: top-1 accuracy of a classifier on labelled inputs.

    Parameters
    ----------
    inputs : array or tensor
        ``(N, ...)`` model inputs (held-out data, not the training set).
    labels : array or tensor
        ``(N,)`` integer class labels.
    batch_size : int
    device : str or torch.device, optional
        Where to run the model (default: where its parameters are).

    Returns
    -------
    callable
        ``(model) -> float``, the share of inputs whose largest output is the label;
        the model runs in eval mode under ``torch.inference_mode`` and its
        training flag is restored.
    """
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise InvalidArgumentError(
            f"labels must have shape (N,) with N = {x.shape[0]} inputs, got {tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InvalidTypeError(f"labels must be integer class indices, got {y.dtype}")
    if device is not None:  # checked now, not when the first checkpoint runs
        device = check_device(device, "accuracy's device")

    def quality(model: nn.Module) -> float:
        dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
        was_training = model.training
        model.eval()
        correct = 0
        try:
            with torch.inference_mode():
                for i in range(0, len(x), batch_size):
                    out = model(x[i : i + batch_size].to(dev))
                    if out.ndim != 2:
                        raise InvalidArgumentError(
                            f"accuracy needs a classifier whose output is (batch, classes); "
                            f"the model gave shape {tuple(out.shape)}"
                        )
                    correct += int((out.argmax(1).cpu() == y[i : i + batch_size]).sum())
        finally:
            model.train(was_training)
        return correct / len(x)

    quality.__qualname__ = "accuracy"
    return quality
