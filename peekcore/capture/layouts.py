"""Which layers, and how their outputs are picked and laid out samples first."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError, InvalidTypeError, UnknownNameError
from ..fingerprints import describe_callable

LAYOUTS = ("auto", "channels_first", "channels_last", "tokens", "sequence_first")


def _channel_first_modules() -> tuple[type, ...]:
    names = [
        ("conv", "_ConvNd"),
        ("batchnorm", "_BatchNorm"),
        ("instancenorm", "_InstanceNorm"),
        ("normalization", "GroupNorm"),
        ("pooling", "_MaxPoolNd"),
        ("pooling", "_AvgPoolNd"),
        ("pooling", "_AdaptiveAvgPoolNd"),
        ("pooling", "_AdaptiveMaxPoolNd"),
        ("pooling", "_LPPoolNd"),
    ]
    found = []
    for mod, cls in names:
        found_cls = getattr(getattr(nn.modules, mod, None), cls, None)
        if isinstance(found_cls, type):
            found.append(found_cls)
    return tuple(found)


_CHANNEL_FIRST = _channel_first_modules()


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> dict[str, nn.Module]:
    """Modules of ``model`` by name, as ``model.get_submodule`` finds them.

    Parameters
    ----------
    model : torch.nn.Module
    layers : str or sequence of str
        Dotted names, e.g. ``"layer3"`` or ``["features.4", "features.8"]``.

    Returns
    -------
    dict
        ``name -> module``, in the order given.

    Raises
    ------
    UnknownNameError
        For a name that is not a submodule, listing the closest names.
    InvalidTypeError
        For ``layers`` that is neither a name nor a list of names (None, say).
    InvalidArgumentError
        For an empty list, a repeated name, or the empty name (the whole model).
    """
    if isinstance(layers, str):
        names = [layers]
    else:
        try:
            names = list(layers)
        except TypeError:
            raise InvalidTypeError(
                f"layers must be a layer name or a list of names, e.g. layers=['layer3']; got "
                f"{layers!r} (the names are those of model.named_modules())"
            ) from None
    if not names:
        raise InvalidArgumentError(
            "layers is empty: name at least one layer, e.g. layers=['layer3']"
        )
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"layers lists a layer twice: {names}")
    found: dict[str, nn.Module] = {}
    all_names = [n for n, _ in model.named_modules() if n]
    for name in names:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(
                f"layer names are non-empty strings such as 'layer3'; got {name!r} (the whole "
                "model's output cannot be captured by name: wrap the model or name its last layer)"
            )
        if name.startswith("__"):
            raise InvalidArgumentError(
                f"layer name {name!r}: names starting with '__' cannot be stored"
            )
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.5)
            hint = f" Closest names: {', '.join(close)}." if close else ""
            shown = ", ".join(all_names[:12]) + (", ..." if len(all_names) > 12 else "")
            raise UnknownNameError(
                f"{type(model).__name__} has no layer {name!r}.{hint} Its layers: {shown} "
                "(see model.named_modules())"
            ) from None
    return found


def _per_layer(value: Any, names: Sequence[str], what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise InvalidArgumentError(f"{what} names layers that are not captured: {unknown}")
        return {n: value.get(n, None if what == "select" else "auto") for n in names}
    return dict.fromkeys(names, value)


def _describe_select(select: Any) -> Any:
    if select is None or isinstance(select, (int, str)):
        return select
    return describe_callable(select)


def _apply_select(name: str, output: Any, select: Any) -> torch.Tensor:
    if select is None:
        out = output
    elif callable(select):
        out = select(output)
    elif isinstance(select, int) and isinstance(output, (tuple, list)):
        if not -len(output) <= select < len(output):
            raise InvalidArgumentError(
                f"layer {name!r} returns a {type(output).__name__} of {len(output)} items; "
                f"select={select} is out of range"
            )
        out = output[select]
    elif isinstance(select, str) and isinstance(output, Mapping):
        if select not in output:
            raise InvalidArgumentError(
                f"layer {name!r} returns a mapping with keys {list(output)}; select={select!r} "
                "is not one of them"
            )
        out = output[select]
    elif isinstance(select, str) and hasattr(output, select):
        out = getattr(output, select)
    else:
        raise InvalidArgumentError(
            f"select={select!r} cannot pick from the {type(output).__name__} that layer "
            f"{name!r} returns: use an int for tuples/lists, a key or attribute name, or a "
            "callable"
        )
    if isinstance(out, torch.Tensor):
        return out
    raise InvalidTypeError(
        f"layer {name!r} returns {_describe_output(out)}, not a tensor: pass select= to pick "
        "one (an int index for tuples, a key or attribute name, or a callable), e.g. "
        f"select={{{name!r}: 0}}"
    )


def _describe_output(out: Any) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor{tuple(x.shape)}"
        return type(x).__name__

    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} ({', '.join(one(x) for x in out)})"
    if isinstance(out, Mapping):
        return "a dict {" + ", ".join(f"{k!r}: {one(v)}" for k, v in out.items()) + "}"
    return f"a {type(out).__name__}"


def _resolve_layout(layout: str, module: nn.Module, ndim: int) -> str:
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "auto":
        return layout
    if ndim == 3 and not isinstance(module, _CHANNEL_FIRST):
        return "tokens"
    return "channels_first"


def _arrange(
    name: str, t: torch.Tensor, layout: str, fold_spatial: bool, batch: int
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Put a layer output samples first, channels second; return it with dim names."""
    if layout in ("tokens", "sequence_first"):
        if t.ndim != 3:
            raise InvalidArgumentError(
                f"layer {name!r} gives a {t.ndim}-way output {tuple(t.shape)}; layout={layout!r} "
                "needs a 3-way token output"
            )
        t = t.permute(0, 2, 1) if layout == "tokens" else t.permute(1, 2, 0)
        dims: tuple[str, ...] = ("sample", "channel", "token")
    else:
        if t.ndim < 2 or t.ndim > 5:
            raise InvalidArgumentError(
                f"layer {name!r} gives a {t.ndim}-way output {tuple(t.shape)}; peekcore stores "
                "2- to 5-way outputs (samples first): pick another layer or use select="
            )
        if layout == "channels_last":
            t = t.movedim(-1, 1)
        spatial = {2: (), 3: ("x",), 4: ("y", "x"), 5: ("z", "y", "x")}[t.ndim]
        dims = ("sample", "channel", *spatial)
        if fold_spatial and t.ndim >= 4:
            t = t.reshape(t.shape[0], t.shape[1], -1)
            dims = ("sample", "channel", "space")
    if t.shape[0] != batch:
        raise InvalidArgumentError(
            f"layer {name!r} output has shape {tuple(t.shape)} after layout={layout!r}, but the "
            f"batch has {batch} samples: if its batch dimension is not first, pass "
            f"layout={{{name!r}: 'sequence_first'}} (T x N x D) or the layout that fits"
        )
    return t, dims
