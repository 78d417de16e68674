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

Modules: :mod:`.layouts` (finding layers, picking and laying out their
outputs), :mod:`.hooks` (:class:`LayerHooks`: one forward pass collects every
layer), :mod:`.options` (:class:`CaptureOptions`, the settings both entry
points share), :mod:`.pipeline` (chunk buffers and the writing thread),
:mod:`.driver` (:func:`capture`) and :mod:`.live` (:class:`ModelSource`).
"""

from __future__ import annotations

from .driver import capture, weights_hash
from .hooks import LayerHooks
from .layouts import LAYOUTS, resolve_layers
from .live import ModelSource
from .options import CaptureOptions

__all__ = [
    "capture",
    "CaptureOptions",
    "LayerHooks",
    "ModelSource",
    "resolve_layers",
    "weights_hash",
    "LAYOUTS",
]
