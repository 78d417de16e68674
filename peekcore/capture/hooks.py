"""Forward hooks that collect layer outputs in one pass, and per-batch seeding."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CaptureError, DataError, InvalidTypeError
from .layouts import _apply_select, _arrange, _resolve_layout

BLOCK_BYTES = 2 << 20  # CPU outputs are copied and checked in blocks that stay in cache
# per float dtype: integer views, the sign-less mask, the masked bits of +Inf (NaN above)
_FLOAT_BITS = {
    torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


class _StopForward(BaseException):
    """Raised by the last hook to skip the rest of the forward pass."""


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
                raise CaptureError(
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
        given = x.dtype  # before prepare() converts floats: the dtype an error names
        x = self.prepare(x)
        self._outputs = {}
        self.finite = {}
        self.in_place = set()
        self._dest = dest or {}
        self._batch = int(x.shape[0])
        ctx = _autocast(self)
        self._running = True
        try:
            with torch.inference_mode(), ctx:
                try:
                    self.model(x)
                except _StopForward:
                    pass
        except (RuntimeError, TypeError) as err:
            self._running = False
            refuse_input_dtype(self.model, x, self._input_dtype, err, _autocast(self), given)
            raise
        finally:
            self._running = False
            self._dest = {}
        missing = [n for n in self.layers if n not in self._outputs]
        if missing:
            raise CaptureError(
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
                        raise DataError(
                            f"layer {name!r} gave a batch of shape {tuple(out.shape)}, but "
                            f"earlier batches had {tuple(target.shape)}: every sample must give "
                            "the same shape (resize inputs to one size)"
                        )
                    target.copy_(out)
                    outputs[name] = target
        return outputs


def refuse_input_dtype(
    model: nn.Module,
    x: torch.Tensor,
    want: torch.dtype | None,
    err: BaseException,
    autocast: Any = None,
    given: torch.dtype | None = None,
) -> None:
    """Raise an InvalidTypeError for inputs of a dtype the model refused.

    Integer inputs are passed to the model as they are, since they may be what
    it takes (token ids for an embedding, or a forward that converts images
    itself). When its forward failed on them (``err``), the same batch is run
    once more as the model's float dtype, with the hooks inactive and the
    result dropped: if that runs, the dtype was the cause and the error says
    how to convert; otherwise ``err`` stands. Float inputs that the model
    refused are tried as int64 the same way (token ids stored as floats, for
    a model whose first layer is an ``nn.Embedding``). Inputs are never
    rescaled here: the right scale depends on how the model was trained.

    Parameters
    ----------
    model : torch.nn.Module
        Its hooks must do nothing during this call.
    x : torch.Tensor
        The batch it refused, on its device.
    want : torch.dtype or None
        The dtype of its first floating-point parameter (None: it has none).
    err : BaseException
        What its forward raised.
    autocast : context manager, optional
        The autocast the forward ran under.
    given : torch.dtype, optional
        The dtype of the inputs as given, before a conversion to ``want``
        (default: ``x.dtype``).
    """
    if x.is_floating_point():
        _refuse_float_indices(model, x, err, autocast, given or x.dtype)
        return
    if want is None or x.is_complex():
        return
    try:
        with torch.inference_mode(), autocast or contextlib.nullcontext():
            model(x.to(want))
    except Exception:  # the dtype was not (the only) trouble: torch's error stands
        return
    name = str(x.dtype).removeprefix("torch.")
    array_fix, tensor_fix = "x.astype('float32')", "t.float()"
    if name == "uint8":  # 8-bit images: the common case, and one whose scale is known
        array_fix, tensor_fix = f"{array_fix} / 255", f"{tensor_fix} / 255"
    raise InvalidTypeError(
        f"the inputs are {name} but the model computes in "
        f"{str(want).removeprefix('torch.')} (its first floating-point parameter's dtype) "
        f"and refuses them ({type(err).__name__}: {err}). Convert them to floats as the "
        f"model was trained, e.g. {array_fix} (then normalize as in training), before "
        f"saving the .npy or passing the array, or pass transform=lambda t: {tensor_fix} "
        "(a DataLoader's inputs: convert them in its Dataset); peekcore does not rescale "
        "inputs itself"
    ) from err


def _refuse_float_indices(
    model: nn.Module, x: torch.Tensor, err: BaseException, autocast: Any, given: torch.dtype
) -> None:
    """Raise an InvalidTypeError when the model refused floats and runs on them as int64.

    An ``nn.Embedding`` takes integer indices only, and torch's error for
    floats ("Expected tensor for argument #1 'indices' ...") says nothing of
    where the inputs came from or how to convert them.
    """
    try:
        with torch.inference_mode(), autocast or contextlib.nullcontext():
            model(x.to(torch.int64))
    except Exception:  # the dtype was not (the only) trouble: torch's error stands
        return
    name = str(given).removeprefix("torch.")
    raise InvalidTypeError(
        f"the inputs are {name} but the model takes integer indices (token ids for an "
        f"nn.Embedding, say) and refuses floats ({type(err).__name__}: {err}). Give them "
        "as integers, e.g. x.astype('int64') before saving the .npy or passing the array, "
        "or pass transform=lambda t: t.long() (a DataLoader's inputs: convert them in its "
        "Dataset)"
    ) from err


def _autocast(hooks: LayerHooks) -> Any:
    if hooks.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=hooks.device.type, dtype=hooks.autocast)


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
