"""Hook a model's layers: capture their activations into a store, or stream them live.

- :func:`capture` runs a model over a data set once and writes the outputs of
  one or more layers into an :class:`~peekcore.store.ActivationStore` (zarr),
  resumably.
- :class:`ModelSource` is a chunk source (``peekcore.sources``) that runs the
  model again on every pass, for when there is no room on disk.

Both find layers by name (``model.get_submodule``), collect all of them in one
forward pass with forward hooks, run the model in eval mode under
``torch.inference_mode`` on its device, and lay outputs out samples first:

==================  =====================  ===================================
layer output        stored as              dimension names
==================  =====================  ===================================
``N x C x H x W``   ``N x C x H x W``      sample, channel, y, x
same, folded        ``N x C x (H*W)``      sample, channel, space
``N x T x D``       ``N x D x T``          sample, channel, token
``N x C x L``       ``N x C x L``          sample, channel, x
``N x D``           ``N x D``              sample, channel
==================  =====================  ===================================

``layout`` picks the rule; ``"auto"`` keeps 2-, 4- and 5-way outputs as they
are and treats 3-way outputs as tokens (``N x T x D``), except for modules that
are channels-first by construction (convolutions, batch / instance / group
norms, pooling), whose ``N x C x L`` is kept. Other layouts:
``"channels_first"`` (keep), ``"channels_last"`` (``N x ... x C`` ->
``N x C x ...``, e.g. ConvNeXt / Swin blocks), ``"tokens"`` (``N x T x D``),
``"sequence_first"`` (``T x N x D``, e.g. ``nn.MultiheadAttention`` without
``batch_first``).

Outputs that are not a tensor are picked with ``select``: an ``int`` indexes a
tuple or list (``select=0`` takes the attention output of
``nn.MultiheadAttention``), a ``str`` is a dict key or an attribute name
(``"last_hidden_state"``), a callable gets the output and returns the tensor.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import math
import operator
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .datasets import Inputs, as_inputs, describe_callable
from .store import (
    ActivationStore,
    StoreError,
    StoreWriter,
    check_replaceable,
    check_store_dtype,
    is_empty_dir,
    storage_dtype,
    to_storage,
    zarr_module,
)

__all__ = ["capture", "ModelSource", "resolve_layers", "weights_hash", "LAYOUTS"]

LAYOUTS = ("auto", "channels_first", "channels_last", "tokens", "sequence_first")
DEFAULT_CHUNK_BYTES = 16 << 20
BLOCK_BYTES = 2 << 20  # CPU outputs are copied and checked in blocks that stay in cache
# per float dtype: integer views, the sign-less mask, the masked bits of +Inf (NaN above)
_FLOAT_BITS = {
    torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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


class _StopForward(BaseException):
    """Raised by the last hook to skip the rest of the forward pass."""


# ---------------------------------------------------------------- layers and hooks


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
    KeyError
        For a name that is not a submodule, listing the closest names.
    ValueError
        For an empty list, a repeated name, or the empty name (the whole model).
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("layers is empty: name at least one layer, e.g. layers=['layer3']")
    if len(set(names)) != len(names):
        raise ValueError(f"layers lists a layer twice: {names}")
    found: dict[str, nn.Module] = {}
    all_names = [n for n, _ in model.named_modules() if n]
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"layer names are non-empty strings such as 'layer3'; got {name!r} (the whole "
                "model's output cannot be captured by name: wrap the model or name its last layer)"
            )
        if name.startswith("__"):
            raise ValueError(f"layer name {name!r}: names starting with '__' cannot be stored")
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.5)
            hint = f" Closest names: {', '.join(close)}." if close else ""
            shown = ", ".join(all_names[:12]) + (", ..." if len(all_names) > 12 else "")
            raise KeyError(
                f"{type(model).__name__} has no layer {name!r}.{hint} Its layers: {shown} "
                "(see model.named_modules())"
            ) from None
    return found


def _per_layer(value: Any, names: Sequence[str], what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{what} names layers that are not captured: {unknown}")
        return {n: value.get(n, None if what == "select" else "auto") for n in names}
    return dict.fromkeys(names, value)


def _describe_select(select: Any) -> Any:
    if select is None or isinstance(select, (int, str)):
        return select
    return describe_callable(select)


def _check_seed(seed: Any) -> int | None:
    """``seed`` as a Python int (numpy and other integer types too), or None."""
    if seed is None:
        return None
    if not isinstance(seed, (bool, np.bool_)):
        with contextlib.suppress(TypeError):
            return operator.index(seed)
    raise TypeError(f"seed must be an integer or None, got {seed!r}")


def _apply_select(name: str, output: Any, select: Any) -> torch.Tensor:
    if select is None:
        out = output
    elif callable(select):
        out = select(output)
    elif isinstance(select, int) and isinstance(output, (tuple, list)):
        if not -len(output) <= select < len(output):
            raise ValueError(
                f"layer {name!r} returns a {type(output).__name__} of {len(output)} items; "
                f"select={select} is out of range"
            )
        out = output[select]
    elif isinstance(select, str) and isinstance(output, Mapping):
        if select not in output:
            raise ValueError(
                f"layer {name!r} returns a mapping with keys {list(output)}; select={select!r} "
                "is not one of them"
            )
        out = output[select]
    elif isinstance(select, str) and hasattr(output, select):
        out = getattr(output, select)
    else:
        raise ValueError(
            f"select={select!r} cannot pick from the {type(output).__name__} that layer "
            f"{name!r} returns: use an int for tuples/lists, a key or attribute name, or a "
            "callable"
        )
    if isinstance(out, torch.Tensor):
        return out
    raise TypeError(
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
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
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
            raise ValueError(
                f"layer {name!r} gives a {t.ndim}-way output {tuple(t.shape)}; layout={layout!r} "
                "needs a 3-way token output"
            )
        t = t.permute(0, 2, 1) if layout == "tokens" else t.permute(1, 2, 0)
        dims: tuple[str, ...] = ("sample", "channel", "token")
    else:
        if t.ndim < 2 or t.ndim > 5:
            raise ValueError(
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
        raise ValueError(
            f"layer {name!r} output has shape {tuple(t.shape)} after layout={layout!r}, but the "
            f"batch has {batch} samples: if its batch dimension is not first, pass "
            f"layout={{{name!r}: 'sequence_first'}} (T x N x D) or the layout that fits"
        )
    return t, dims


class LayerHooks:
    """Forward hooks on named layers, collecting every layer in one forward pass.

    Used as a context manager: on entry the model is put in eval mode and the
    hooks are registered; on exit both are undone. Entries nest (several
    passes over a model at once): only the outermost one saves the training
    flags and registers the hooks, and only its exit removes the hooks and
    restores the flags. :meth:`run` does one forward pass and returns each
    layer's output, arranged samples first and converted to ``dtype`` (a copy:
    later in-place operations cannot change it). The hooks act only inside
    :meth:`run`: other forwards of the model meanwhile (the caller's own) run as
    they would without them. The first forward runs whole (a layer that runs
    twice is an error); later ones stop once every hooked layer has produced
    its output.

    Parameters
    ----------
    model : torch.nn.Module
    layers : dict of name -> module
        From :func:`resolve_layers`.
    dtype : torch.dtype
        Dtype of the returned activations.
    layout, select : per-layer dicts
        See the module docstring.
    fold_spatial : bool
        Fold ``H x W`` (and ``D x H x W``) into one mode.
    device : torch.device
        Where inputs go.
    autocast : torch.dtype or None
        Run the forward under ``torch.autocast`` with this dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        *,
        dtype: torch.dtype,
        layout: dict[str, str],
        select: dict[str, Any],
        fold_spatial: bool,
        device: torch.device,
        autocast: torch.dtype | None,
    ) -> None:
        self.model = model
        self.layers = layers
        self.dtype = dtype
        self.layout = layout
        self.select = select
        self.fold_spatial = fold_spatial
        self.device = device
        self.autocast = autocast
        self.dims: dict[str, tuple[str, ...]] = {}
        self.resolved_layout: dict[str, str] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._dest: dict[str, torch.Tensor] = {}
        self.check_finite = False
        self.finite: dict[str, bool] = {}
        # called with (layer, block) for each block written into a ``dest`` view, in order;
        # the block is a numpy array of the stored bits
        self.on_block: Callable[[str, np.ndarray], None] | None = None
        self.in_place: set[str] = set()
        self._batch = 0
        self._handles: list[Any] = []
        self._stop_early = False  # the first forward runs whole, to catch layers that run twice
        self._modes: list[tuple[nn.Module, bool]] = []
        self._depth = 0  # nested entries (see __enter__)
        self._running = False  # inside run(): the only time the hooks do anything
        params = [p for p in model.parameters() if p.is_floating_point()]
        self._input_dtype = params[0].dtype if params else None

    def __enter__(self) -> LayerHooks:
        if self._depth == 0:
            self._modes = [(m, m.training) for m in self.model.modules()]
            self.model.eval()
            try:
                for name, module in self.layers.items():
                    self._handles.append(module.register_forward_hook(self._hook(name, module)))
            except BaseException:
                self._undo()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._undo()

    def _undo(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, training in self._modes:
            module.training = training
        self._modes = []

    def _hook(self, name: str, module: nn.Module) -> Callable:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if not self._running:  # a forward of the model's owner, not one of run()'s
                return
            if name in self._outputs:
                raise RuntimeError(
                    f"layer {name!r} ran twice in one forward pass (a shared module?): its "
                    "output is ambiguous; hook a module that runs once per forward"
                )
            t = _apply_select(name, output, self.select[name])
            layout = self.resolved_layout.get(name)
            if layout is None:
                layout = _resolve_layout(self.layout[name], module, t.ndim)
                self.resolved_layout[name] = layout
            t, dims = _arrange(name, t.detach(), layout, self.fold_spatial, self._batch)
            self.dims.setdefault(name, dims)
            out = self._dest.get(name)
            in_place = out is not None and out.device == t.device and out.shape == t.shape
            if not in_place:
                out = torch.empty(t.shape, dtype=self.dtype, device=t.device)
            self._store(name, t, out, in_place)
            self._outputs[name] = out
            if self._stop_early and len(self._outputs) == len(self.layers):
                raise _StopForward

        return hook

    def _store(self, name: str, t: torch.Tensor, out: torch.Tensor, in_place: bool) -> None:
        """Copy ``t`` into ``out`` (converting), check it is finite, report blocks written.

        On the CPU a conversion is one torch operation for the whole batch; plain
        copies, the finite check (on the stored bits) and ``on_block`` (the
        caller's checksum) then go through blocks of about ``BLOCK_BYTES`` with
        numpy, so that each block is read while it is in cache and no small torch
        operation waits for its thread pool.
        """
        if out.device.type != "cpu":
            out.copy_(t)
            if self.check_finite:
                self.finite[name] = bool(torch.isfinite(out).all())
            return
        same = t.dtype == out.dtype
        if not same:
            out.copy_(t)
        dst, mask, inf_bits = _bits(out)
        src = _bits(t)[0] if same else None
        rows = out.shape[0]
        step = max(1, BLOCK_BYTES // max(1, dst[0].nbytes)) if rows else 1
        finite = True
        for lo in range(0, rows, step):
            block = dst[lo : lo + step]
            if src is not None:
                np.copyto(block, src[lo : lo + step])
            if self.check_finite and finite and block.size:
                # NaN and Inf are the values whose exponent bits are all ones
                finite = int(np.bitwise_and(block, mask).max()) < inf_bits
            if in_place and self.on_block is not None:
                self.on_block(name, block)
        if in_place:
            self.in_place.add(name)
        if self.check_finite:
            self.finite[name] = finite

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Move an input batch to the model's device (and floating dtype)."""
        x = x.to(self.device, non_blocking=True)
        if (
            self.autocast is None
            and self._input_dtype is not None
            and x.is_floating_point()
            and x.dtype != self._input_dtype
        ):
            x = x.to(self._input_dtype)
        return x

    def run(
        self, x: torch.Tensor, dest: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """One forward pass on a batch: ``{layer: (b, ...) activations}``.

        Parameters
        ----------
        x : torch.Tensor
            The input batch ``(b, ...)``, on any device.
        dest : dict of layer -> tensor, optional
            Where to put the activations (e.g. views into host buffers); they
            are written there directly and returned. Without it, new tensors on
            the model's device are returned.
        """
        x = self.prepare(x)
        self._outputs = {}
        self.finite = {}
        self.in_place = set()
        self._dest = dest or {}
        self._batch = int(x.shape[0])
        ctx = (
            torch.autocast(device_type=self.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        self._running = True
        try:
            with torch.inference_mode(), ctx:
                try:
                    self.model(x)
                except _StopForward:
                    pass
        finally:
            self._running = False
            self._dest = {}
        missing = [n for n in self.layers if n not in self._outputs]
        if missing:
            raise RuntimeError(
                f"layers {missing} produced no output in the forward pass: their modules were "
                "not called (a fused fast path such as nn.TransformerEncoderLayer's in eval "
                "mode skips its submodules, and torch.compile may too); hook a module that "
                "runs, e.g. the enclosing block"
            )
        outputs, self._outputs = self._outputs, {}
        self._stop_early = True
        if dest:
            for name, out in outputs.items():
                target = dest.get(name)
                if target is not None and target is not out:
                    if target.shape != out.shape:
                        raise ValueError(
                            f"layer {name!r} gave a batch of shape {tuple(out.shape)}, but "
                            f"earlier batches had {tuple(target.shape)}: every sample must give "
                            "the same shape (resize inputs to one size)"
                        )
                    target.copy_(out)
                    outputs[name] = target
        return outputs


def _bits(t: torch.Tensor) -> tuple[np.ndarray, Any, int]:
    """A CPU float tensor's memory as unsigned integers, with its NaN/Inf test.

    Returns the uint array (a view, same shape and strides), the mask of the
    exponent and mantissa bits, and the masked value from which on an element
    is NaN or Inf (its exponent bits are all ones).
    """
    as_int, as_uint, mask, inf_bits = _FLOAT_BITS[t.dtype]
    return t.view(as_int).numpy().view(as_uint), as_uint(mask), inf_bits


def _bit_view(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's elements as integers of the same size: its bit patterns."""
    return t.view(_FLOAT_BITS[t.dtype][0]) if t.dtype in _FLOAT_BITS else t


def _model_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        model.to(dev)
        return dev
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _autocast_dtype(autocast: Any, device: torch.device) -> torch.dtype | None:
    if autocast is None or autocast is False:
        return None
    if autocast is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    name = str(autocast).removeprefix("torch.")
    if name in ("float16", "bfloat16"):
        return _TORCH_DTYPES[name]
    raise ValueError(f"autocast must be False, True, 'float16' or 'bfloat16'; got {autocast!r}")


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and values).

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    str
        64 hex digits; equal for models with bit-identical weights and buffers.
    """
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            h.update(t.numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    zarr = zarr_module()
    return {
        "peekcore": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "python": sys.version.split()[0],
    }


@contextlib.contextmanager
def _batch_rng(seed: int | None, offset: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for the batch starting at ``offset``; restore the caller's state after."""
    if seed is None:
        yield
        return
    value = (int(seed) * 0x9E3779B1 + int(offset)) % (1 << 63)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        # the CPU generator (and this device's), not torch.manual_seed: that one also
        # queues lazy seeding of every accelerator, which costs milliseconds per call
        torch.default_generator.manual_seed(value)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(value)
        yield


def _progress_bar(progress: bool | None, total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        unit_scale=True,
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
    )


# ---------------------------------------------------------------- capture


def _crc32c_extend() -> Callable[[int, np.ndarray], int]:
    import google_crc32c

    return google_crc32c.extend


class _ChunkPipeline:
    """Fills store chunks batch by batch; a background thread writes the full ones.

    Buffers are reused: at most ``n_sets`` chunk-sized sets exist (one being
    filled, the others queued or being written). That bounds memory, avoids
    touching fresh pages for every chunk, and makes the model wait when the
    disk is slower. Batches are written straight into the chunk being filled
    when they fit (see :meth:`slot`).
    """

    def __init__(
        self, writer: StoreWriter, shapes: dict[str, tuple[int, ...]], dtype: str, n_sets: int = 3
    ) -> None:
        self.writer = writer
        self.shapes = shapes
        self.dtype = dtype
        self.np_dtype = storage_dtype(dtype)
        self.label_info = writer.attrs.get("label_info")
        self._free: queue.Queue = queue.Queue()
        self._todo: queue.Queue = queue.Queue()
        self._made = 0
        self._n_sets = n_sets
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="peekcore-write", daemon=True)
        self._thread.start()
        self.index = writer.chunks_written
        self.filled = 0
        # CRC32C of each layer's chunk, extended batch by batch while the bytes are fresh
        # in cache, so that the writing thread only writes
        self._crc_extend = _crc32c_extend() if writer.direct else None
        self._crc: dict[str, int] = dict.fromkeys(shapes, 0)
        self._set = self._acquire() if self.index < writer.n_chunks else None

    # -- buffers

    def _acquire(self) -> dict:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._n_sets:
            self._made += 1
            cs = self.writer.chunk_size
            info = self.label_info
            return {
                "acts": {n: np.empty((cs, *s), self.np_dtype) for n, s in self.shapes.items()},
                "labels": np.empty((cs, *info["shape"]), np.dtype(info["dtype"])) if info else None,
            }
        while True:
            self._raise()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _rows(self) -> int:
        lo = self.index * self.writer.chunk_size
        return min(self.writer.chunk_size, self.writer.n_samples - lo)

    def slot(self, b: int) -> dict[str, torch.Tensor] | None:
        """Tensor views of the next ``b`` rows of the chunk being filled, if they fit."""
        if self._set is None or self.filled + b > self._rows():
            return None
        views = {}
        for name, arr in self._set["acts"].items():
            part = arr[self.filled : self.filled + b]
            if self.dtype == "bfloat16":
                views[name] = torch.from_numpy(part.view(np.int16)).view(torch.bfloat16)
            else:
                views[name] = torch.from_numpy(part)
        return views

    # -- filling

    def extend_checksum(self, name: str, block: np.ndarray) -> None:
        """Extend layer ``name``'s chunk checksum by rows just written into a :meth:`slot`."""
        if self._crc_extend is not None:
            raw = block.reshape(-1).view(np.uint8)
            self._crc[name] = self._crc_extend(self._crc[name], raw)

    def add(
        self,
        acts: dict[str, torch.Tensor] | None,
        labels: np.ndarray | None,
        b: int,
        summed: set[str] = frozenset(),
    ) -> None:
        """Append ``b`` consecutive samples.

        ``acts`` are CPU tensors in the store dtype, or ``None`` when the batch
        was already written into :meth:`slot`'s views; ``summed``: layers whose
        checksum :meth:`extend_checksum` already extended by these rows.
        """
        pos = 0
        while pos < b:
            if self._set is None:
                raise RuntimeError("the data yielded more samples than it declares")
            rows = self._rows()
            take = min(rows - self.filled, b - pos)
            for name, dst in self._set["acts"].items():
                rows_now = dst[self.filled : self.filled + take]
                if acts is not None:
                    rows_now[...] = to_storage(acts[name][pos : pos + take])
                if self._crc_extend is not None and name not in summed:
                    raw = rows_now.reshape(-1).view(np.uint8)
                    self._crc[name] = self._crc_extend(self._crc[name], raw)
            if self._set["labels"] is not None:
                self._set["labels"][self.filled : self.filled + take] = labels[pos : pos + take]
            self.filled += take
            pos += take
            if self.filled == rows:
                self._emit(rows)

    def _emit(self, rows: int) -> None:
        self._raise()
        bufset = self._set
        acts = {n: a[:rows] for n, a in bufset["acts"].items()}
        labels = None if bufset["labels"] is None else bufset["labels"][:rows]
        crcs = dict(self._crc) if self._crc_extend is not None else None
        self._todo.put((self.index, acts, labels, crcs, bufset))
        self._crc = dict.fromkeys(self._crc, 0)
        self.index += 1
        self.filled = 0
        self._set = self._acquire() if self.index < self.writer.n_chunks else None

    # -- the writing thread

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            index, acts, labels, crcs, bufset = item
            try:
                if self._error is None:
                    self.writer.write_chunk(index, acts, labels, crcs)
            except BaseException as err:  # handed to the main thread
                self._error = err
            finally:
                self._free.put(bufset)

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing the store failed: {self._error}") from self._error

    def close(self, raise_error: bool = True) -> None:
        """Finish pending writes (also after an error in the caller) and record them."""
        self._todo.put(None)
        self._thread.join()
        try:
            self.writer.record_progress()
        except Exception:
            if raise_error:
                raise
        if raise_error:
            self._raise()


def capture(
    model: nn.Module,
    data: Any,
    layers: str | Sequence[str],
    store: str | Path,
    *,
    dtype: str = "float16",
    batch_size: int = 64,
    chunk_size: int | None = None,
    device: Any = None,
    autocast: bool | str | torch.dtype = False,
    layout: str | Mapping[str, str] = "auto",
    select: Any = None,
    fold_spatial: bool = False,
    n_samples: int | None = None,
    transform: Callable | None = None,
    seed: int | None = 0,
    num_workers: int = 0,
    check_finite: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ActivationStore:
    """Run ``model`` over ``data`` once and store the activations of ``layers``.

    All layers are collected in one forward pass per batch (forward hooks; after
    the first batch the forward stops once every hooked layer has run). The
    model runs in eval mode under ``torch.inference_mode`` on its device; its
    training flags are restored afterwards. Activations go straight into reused
    chunk buffers, and a background thread writes full chunks while the model
    runs. If the process dies, calling ``capture`` again with the same arguments
    continues after the last complete chunk and gives the same store, byte for
    byte, as an uninterrupted run.

    Parameters
    ----------
    model : torch.nn.Module
    data : array, tensor, tuple, path, Dataset or DataLoader
        Inputs ``(N, ...)``; see :mod:`peekcore.datasets` for every form.
    layers : str or sequence of str
        Module names as ``model.get_submodule`` takes them. A wrong name gets a
        ``KeyError`` listing the closest names.
    store : path-like
        Folder of the zarr store to write (created; parents too).
    dtype : {"float16", "bfloat16", "float32"}
        Stored dtype of the activations.
    batch_size : int
        Samples per forward pass (ignored for a DataLoader, whose batches are
        used as they come).
    chunk_size : int, optional
        Samples per stored chunk; default: about 16 MiB for the largest layer, in
        whole batches (at least one batch).
        Resuming keeps the store's chunk size.
    device : str or torch.device, optional
        Run there (the model is moved with ``model.to``); default: where the
        model's parameters are.
    autocast : bool or {"float16", "bfloat16"}
        Run the forward under ``torch.autocast`` (``True``: float16 on CUDA,
        bfloat16 on the CPU).
    layout : str or dict of layer -> str
        How outputs are laid out (module docstring): ``"auto"``,
        ``"channels_first"``, ``"channels_last"``, ``"tokens"``, ``"sequence_first"``.
    select : int, str, callable or dict of layer -> selector, optional
        Picks the tensor from outputs that are tuples, dicts or objects.
    fold_spatial : bool
        Store ``N x C x H x W`` outputs as ``N x C x (H*W)``.
    n_samples : int, optional
        Capture only the first ``n_samples`` samples.
    transform : callable, optional
        Per-sample transform for arrays and image folders (a torch Dataset
        carries its own).
    seed : int or None
        Before each batch the torch RNG is seeded from ``seed`` and the batch's
        first sample index, so random operations in the forward give the same
        values after a resume; your RNG state is restored afterwards.
    num_workers : int
        DataLoader workers for a torch Dataset.
    check_finite : bool
        Refuse NaN/Inf activations (e.g. float16 overflow) as they are captured.
    overwrite : bool
        Replace an existing store at ``store`` instead of resuming it. The old
        store stays until the first batch has run and the new store's metadata
        is ready, so a capture that fails at once (a wrong layout, say) leaves
        it; from then on the new store is at ``store`` (and resumable). An
        empty folder at ``store`` counts as no store.
    progress : bool, optional
        Show a progress bar (images per second); default: when stderr is a terminal.

    Returns
    -------
    ActivationStore
        The complete store; ``store[layer]`` is a chunk source of shape
        ``(N, C, ...)`` for :func:`peekcore.cp_als`.

    Raises
    ------
    StoreError
        An existing store at ``store`` was made with other settings (the message
        lists them), or is damaged.

    Examples
    --------
    >>> store = peekcore.capture(model, peekcore.datasets.digits(), ["conv1", "conv2"],
    ...                          "digits.zarr", dtype="float32")  # doctest: +SKIP
    >>> peekcore.cp_als(store["conv2"], rank=8)                 # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = resolve_layers(model, layers)
    names = list(modules)
    dtype = check_store_dtype(dtype)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    seed = _check_seed(seed)
    dev = _model_device(model, device)
    inputs = as_inputs(
        data,
        batch_size=batch_size,
        n_samples=n_samples,
        num_workers=num_workers,
        transform=transform,
        pin_memory=dev.type == "cuda",
    )
    layouts = _per_layer(layout, names, "layout")
    selects = _per_layer(select, names, "select")
    auto = _autocast_dtype(autocast, dev)
    settings = {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights_sha256": weights_hash(model),
        "layers": names,
        "layout": layouts,
        "select": {n: _describe_select(s) for n, s in selects.items()},
        "fold_spatial": bool(fold_spatial),
        "dtype": dtype,
        "batch_size": None if inputs.loader is not None else int(batch_size),
        "n_samples": inputs.n_samples,
        "data_fingerprint": inputs.fingerprint,
        "transform": inputs.transform,
        "seed": seed,
        "autocast": None if auto is None else str(auto).removeprefix("torch."),
    }
    path = Path(store)
    writer: StoreWriter | None = None
    # an empty folder is no store (made ahead by the caller); a store to overwrite is
    # replaced only once the first batch ran and the new store is ready (StoreWriter.create)
    replace = os.path.lexists(path) and not is_empty_dir(path) and overwrite
    if replace:
        check_replaceable(path)  # before any work: refuse a folder that is not a store
    elif os.path.lexists(path) and not is_empty_dir(path):
        writer = _resume(path, settings, chunk_size)
        if writer.complete:
            return ActivationStore(path)
    provenance = {
        "model_class": settings["model_class"],
        "weights_sha256": settings["weights_sha256"],
        "data_source": inputs.description,
        "transform": inputs.transform,
        "seed": seed,
        "device": str(dev),
        "versions": _versions(),
    }
    hooks = LayerHooks(
        model,
        modules,
        dtype=_TORCH_DTYPES[dtype],
        layout=layouts,
        select=selects,
        fold_spatial=fold_spatial,
        device=dev,
        autocast=auto,
    )
    start = 0 if writer is None else writer.samples_written
    hooks.check_finite = check_finite
    bar = _progress_bar(progress, inputs.n_samples, start, "capture")
    pipeline: _ChunkPipeline | None = None
    try:
        with hooks:
            for offset, x, y in inputs.batches(start):
                b = int(x.shape[0])
                skip = max(0, start - offset)
                dest = pipeline.slot(b) if pipeline is not None and skip == 0 else None
                with _batch_rng(seed, offset, dev):
                    acts = hooks.run(x, dest)
                if check_finite:
                    _check_finite(hooks.finite, offset, dtype)
                labels = None if y is None else np.asarray(y)[skip:]
                if pipeline is None:
                    host = {n: t[skip:].cpu() for n, t in acts.items()}
                    if writer is None:
                        writer = _create(
                            path,
                            inputs,
                            host,
                            labels,
                            hooks,
                            settings,
                            provenance,
                            dtype,
                            chunk_size,
                            replace,
                        )
                    else:
                        _check_shapes(path, writer, host, labels)
                    shapes = {n: tuple(t.shape[1:]) for n, t in host.items()}
                    pipeline = _ChunkPipeline(writer, shapes, dtype)
                    hooks.on_block = pipeline.extend_checksum
                    pipeline.add(host, labels, b - skip)
                elif dest is not None:
                    pipeline.add(None, labels, b, summed=hooks.in_place)
                else:
                    pipeline.add({n: t[skip:].cpu() for n, t in acts.items()}, labels, b - skip)
                bar.update(b - skip)
    except BaseException:
        if pipeline is not None:
            pipeline.close(raise_error=False)  # keep what was written: a rerun resumes
        raise
    finally:
        bar.close()
    if pipeline is not None:
        pipeline.close()
    if writer is None or not writer.complete:
        raise RuntimeError(
            f"the data yielded fewer samples than the {inputs.n_samples} it declares; the store "
            f"{path} is incomplete (pass n_samples= to capture fewer)"
        )
    return ActivationStore(path)


def _check_finite(finite: dict[str, bool], offset: int, dtype: str) -> None:
    for name, ok in finite.items():
        if ok:
            continue
        hint = (
            " (float16 overflows above 65504: capture with dtype='bfloat16' or 'float32')"
            if dtype == "float16"
            else ""
        )
        raise ValueError(
            f"layer {name!r} gave NaN or Inf for the batch starting at sample {offset}"
            f"{hint}; pass check_finite=False to store them anyway"
        )


def _resume(path: Path, settings: dict, chunk_size: int | None) -> StoreWriter:
    writer = StoreWriter.open(path)
    stored = writer.attrs.get("settings", {})
    now = _json_round(settings)
    diffs = [
        f"{key}: store has {stored.get(key)!r}, this call {now[key]!r}"
        for key in now
        if stored.get(key) != now[key]
    ]
    if chunk_size is not None and int(chunk_size) != writer.chunk_size:
        diffs.append(f"chunk_size: store has {writer.chunk_size}, this call {chunk_size}")
    if diffs:
        raise StoreError(
            f"the store {path} was captured with other settings, so it cannot be resumed or "
            "reused:\n- " + "\n- ".join(diffs) + "\nPass the same arguments to resume it, "
            "overwrite=True to replace it, or another store path"
        )
    return writer


def _json_round(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj))


def _create(
    path: Path,
    inputs: Inputs,
    host: dict[str, torch.Tensor],
    labels: np.ndarray | None,
    hooks: LayerHooks,
    settings: dict,
    provenance: dict,
    dtype: str,
    chunk_size: int | None,
    replace: bool = False,
) -> StoreWriter:
    n = inputs.n_samples
    if chunk_size is None:
        per_sample = max(math.prod(t.shape[1:]) * t.element_size() for t in host.values())
        chunk_size = max(1, DEFAULT_CHUNK_BYTES // max(1, per_sample))
        batch = inputs.loader.batch_size if inputs.loader is not None else inputs.batch_size
        if batch and batch * per_sample <= 4 * DEFAULT_CHUNK_BYTES:
            # whole batches per chunk, so that batches are written into it in place
            chunk_size = max(batch, chunk_size - chunk_size % batch)
    chunk_size = min(int(chunk_size), n)
    layer_info = {}
    for name, arr in host.items():
        layer_info[name] = {
            "shape": list(arr.shape[1:]),
            "dims": list(hooks.dims[name]),
            "attrs": {
                "layer": name,
                "module": type(hooks.layers[name]).__name__,
                "layout": hooks.resolved_layout[name],
                "select": settings["select"][name],
                "fold_spatial": settings["fold_spatial"],
                **provenance,
            },
        }
    label_info = None
    if labels is not None:
        label_info = {"shape": list(labels.shape[1:]), "dtype": labels.dtype.name}
    attrs = {"provenance": provenance, "settings": settings}
    return StoreWriter.create(
        path,
        n_samples=n,
        chunk_size=chunk_size,
        dtype=dtype,
        layers=layer_info,
        label_info=label_info,
        attrs=attrs,
        replace=replace,
    )


def _check_shapes(
    path: Path, writer: StoreWriter, host: dict[str, torch.Tensor], labels: np.ndarray | None
) -> None:
    for name, arr in host.items():
        want = tuple(writer.attrs["layers"][name]["shape"])
        if tuple(arr.shape[1:]) != want:
            raise StoreError(
                f"layer {name!r} now gives samples of shape {tuple(arr.shape[1:])} but the store "
                f"{path} holds {want}: pass overwrite=True to start over"
            )
    if (labels is None) == bool(writer.attrs["has_labels"]):
        raise StoreError(
            f"the data {'has no' if labels is None else 'has'} labels but the store {path} "
            f"{'has' if labels is None else 'has none'}: pass overwrite=True to start over"
        )


# ---------------------------------------------------------------- live source


class ModelSource:
    """A layer of a model as a live chunk source: the model runs once per pass.

    For when the activations do not fit on disk: ``peekcore.cp_als(ModelSource(
    model, data, "layer3"), rank=16)`` recomputes ``layer3`` on every iteration.
    The first batch is computed once at construction (to learn the shape); every
    pass checks that its first batch is bit-identical to it, so a
    non-deterministic model gets a clear error instead of silently wrong factors.

    Parameters
    ----------
    model : torch.nn.Module
    data : array, tensor, tuple, path, Dataset or DataLoader
        As for :func:`capture`.
    layer : str
        One module name.
    dtype : {"float16", "bfloat16", "float32"}
        Dtype of the yielded chunks.
    batch_size, device, autocast, layout, select, fold_spatial, n_samples, transform, seed,
    num_workers
        As for :func:`capture`.

    Attributes
    ----------
    shape : tuple of int
        ``(N, C, ...)`` after the layout rules.
    dtype : str
    dims : tuple of str
        Dimension names, as a store would record them.
    passes : int
        Passes started so far.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        layer: str,
        *,
        dtype: str = "float32",
        batch_size: int = 64,
        device: Any = None,
        autocast: bool | str | torch.dtype = False,
        layout: str = "auto",
        select: Any = None,
        fold_spatial: bool = False,
        n_samples: int | None = None,
        transform: Callable | None = None,
        seed: int | None = 0,
        num_workers: int = 0,
    ) -> None:
        if not isinstance(layer, str):
            raise TypeError(
                f"ModelSource streams one layer; got layer={layer!r}. For several layers use "
                "one ModelSource each, or peekcore.capture"
            )
        self.model = model
        self.layer = layer
        modules = resolve_layers(model, [layer])
        self._dtype = check_store_dtype(dtype)
        self.device = _model_device(model, device)
        self.inputs = as_inputs(
            data,
            batch_size=batch_size,
            n_samples=n_samples,
            num_workers=num_workers,
            transform=transform,
            pin_memory=self.device.type == "cuda",
        )
        self.seed = _check_seed(seed)
        self.passes = 0
        self._hooks = LayerHooks(
            model,
            modules,
            dtype=_TORCH_DTYPES[self._dtype],
            layout={layer: layout},
            select={layer: select},
            fold_spatial=fold_spatial,
            device=self.device,
            autocast=_autocast_dtype(autocast, self.device),
        )
        first = None
        with self._hooks:
            for offset, x, _y in self.inputs.batches(0):
                with _batch_rng(seed, offset, self.device):
                    first = self._hooks.run(x)[layer].cpu()
                break
        if first is None:  # pragma: no cover - Inputs refuses empty data
            raise ValueError("the data is empty")
        self._reference = first
        self._shape = (self.inputs.n_samples, *first.shape[1:])
        self.dims = self._hooks.dims[layer]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> str:
        return self._dtype

    def chunks(self, chunk_size: int) -> Iterator[torch.Tensor]:
        """One pass: run the model over the data, yield ``(b, *shape[1:])`` CPU tensors.

        Parameters
        ----------
        chunk_size : int
            Samples per yielded chunk (batches are regrouped to it; the last
            chunk may be shorter).

        Raises
        ------
        RuntimeError
            When the first batch differs from the one computed at construction.
        """
        step = max(1, int(chunk_size))
        self.passes += 1
        pending: list[torch.Tensor] = []
        held = 0
        for offset, x, _y in self.inputs.batches(0):
            # hooks and eval mode only for this batch's forward: while a chunk is out (the
            # pass suspended, perhaps for good), the model is the caller's, as it was
            with self._hooks, _batch_rng(self.seed, offset, self.device):
                t = self._hooks.run(x)[self.layer].cpu()
            if offset == 0:
                self._check_repeat(t)
            pending.append(t)
            held += t.shape[0]
            while held >= step:
                whole = torch.cat(pending) if len(pending) > 1 else pending[0]
                yield whole[:step]
                rest = whole[step:]
                pending = [rest] if rest.shape[0] else []
                held = rest.shape[0]
        if held:
            yield torch.cat(pending) if len(pending) > 1 else pending[0]

    def _check_repeat(self, t: torch.Tensor) -> None:
        """Refuse a first batch that is not bit for bit the one computed at construction.

        Bit patterns are compared, not values: NaN equals NaN when its bits do.
        """
        ref = self._reference
        same_shape = t.shape == ref.shape
        if same_shape and torch.equal(_bit_view(t), _bit_view(ref)):
            return
        now, then = t.float(), ref.float()
        diff, where = float("nan"), ""
        if same_shape:
            finite = torch.isfinite(now) & torch.isfinite(then)
            if bool(finite.any()):
                diff = float((now - then).abs()[finite].max())
            where = " where both are finite"
        nonfinite = int((~torch.isfinite(now)).sum()), int((~torch.isfinite(then)).sum())
        note = ""
        if any(nonfinite):
            note = (
                f" The activations hold NaN/Inf ({nonfinite[1]} values in the first batch at "
                f"construction, {nonfinite[0]} now); NaN/Inf at other places or with other bit "
                "patterns count as differences too."
            )
        shape = "" if same_shape else f"; shape {tuple(t.shape)}, was {tuple(ref.shape)}"
        raise RuntimeError(
            f"layer {self.layer!r} gave different activations for the same first batch on pass "
            f"{self.passes} (max |difference| {diff:.3g}{where}{shape}): the model is not "
            "deterministic, so each pass of the fit would see different data and the factors "
            f"would be wrong.{note} Remove random operations (dropout in train mode, noise "
            "layers), enable torch.use_deterministic_algorithms(True) on GPUs, or capture the "
            "activations once with peekcore.capture and fit the store"
        )

    def __repr__(self) -> str:
        return (
            f"ModelSource({type(self.model).__name__}, layer={self.layer!r}, shape={self.shape}, "
            f"dtype={self.dtype})"
        )
