"""ModelSource: a layer of a model as a live chunk source, run again on every pass."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CaptureError, DataError, InvalidTypeError
from .hooks import _batch_rng, _bit_view
from .options import CaptureOptions


class ModelSource:
    """A layer of a model as a live chunk source: the model runs once per pass.

    For when the activations do not fit on disk: ``peekcore.cp_als(ModelSource(
    model, data, "layer3"), rank=16)`` recomputes ``layer3`` on every iteration.
    The first batch is computed once at construction (to learn the shape); every
    pass checks that its first batch is bit-identical to it, and that every
    later batch has the digest (CRC32C of its bits) that batch had on the first
    pass that computed it, stopping at the first that differs. So a
    non-deterministic model, also one whose randomness starts after the first
    batch, gets a clear error instead of silently wrong factors.

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

    @CaptureOptions.shown_in(dtype="float32")
    def __init__(self, model: nn.Module, data: Any, layer: str, **options: Any) -> None:
        if not isinstance(layer, str):
            raise InvalidTypeError(
                f"ModelSource streams one layer; got layer={layer!r}. For several layers use "
                "one ModelSource each, or peekcore.capture"
            )
        self.model = model
        self.layer = layer
        run = CaptureOptions.given_to(ModelSource.__init__, options).hook(model, data, [layer])
        self._dtype = run.dtype
        self.device = run.device
        self.inputs = run.inputs
        self.seed = run.seed
        self.passes = 0
        self._hooks = run.hooks
        first = None
        with self._hooks:
            for offset, x, _y in self.inputs.batches(0):
                with _batch_rng(self.seed, offset, self.device):
                    first = self._hooks.run(x)[layer].cpu()
                break
        if first is None:  # pragma: no cover - Inputs refuses empty data
            raise DataError("the data is empty")
        self._reference = first
        # digest of each batch as a pass first computed it (batch 0: the reference itself)
        self._digests: list[tuple] = [_digest(first)]
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
        CaptureError
            When the first batch differs from the one computed at construction,
            or a later one from what it was on the first pass (before any of its
            samples are yielded).
        """
        step = max(1, int(chunk_size))
        self.passes += 1
        pending: list[torch.Tensor] = []
        held = 0
        for k, (offset, x, _y) in enumerate(self.inputs.batches(0)):
            # hooks and eval mode only for this batch's forward: while a chunk is out (the
            # pass suspended, perhaps for good), the model is the caller's, as it was
            with self._hooks, _batch_rng(self.seed, offset, self.device):
                t = self._hooks.run(x)[self.layer].cpu()
            if offset == 0:
                self._check_repeat(t)
            else:
                self._check_digest(k, offset, t)
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

    def _check_digest(self, k: int, offset: int, t: torch.Tensor) -> None:
        """Refuse batch ``k`` when its digest differs from the first pass's; record it when
        no pass reached it before (a pass the caller stopped early)."""
        digest = _digest(t)
        if k == len(self._digests):
            self._digests.append(digest)
            return
        if k < len(self._digests) and digest == self._digests[k]:
            return
        raise CaptureError(
            f"layer {self.layer!r} gave different activations on pass {self.passes} for the "
            f"batch starting at sample {offset} than it gave on the first pass (their CRC32C "
            "digests differ): the model is not deterministic, so each pass of the fit would "
            "see different data and the factors would be wrong. Remove random operations "
            "(dropout in train mode, noise layers, state kept between forwards), enable "
            "torch.use_deterministic_algorithms(True) on GPUs, or capture the activations "
            "once with peekcore.capture and fit the store"
        )

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
        raise CaptureError(
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


def _digest(t: torch.Tensor) -> tuple:
    """Shape and CRC32C of a CPU tensor's bit patterns: cheap (GB/s), and equal for two
    batches exactly when their bits are, barring a 2**-32 chance."""
    import google_crc32c

    bits = _bit_view(t.contiguous()).numpy()
    return tuple(t.shape), google_crc32c.value(bits.reshape(-1).view(np.uint8))
