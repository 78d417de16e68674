"""Edit a layer's output by the components of a CP model of it, inside a forward pass.

A forward hook (:class:`_Edits`) swaps the layer's output, batch by batch, for
``s X + (A * c) P``: ``X`` the activation as captured (samples first, in
peekcore's layout), ``A`` the batch's sample-factor rows times the weights,
``P`` the components' outer products of the non-sample factors, ``s`` 0 or 1
and ``c`` one coefficient per component. The unedited layer is ``(1, 0)``,
removing component ``r`` is ``(1, -e_r)``, keeping ``r`` alone ``(0, e_r)``.

Sample-factor rows come from the fitted model when the data are the samples
it was fitted to; for new data they are the projection of each sample onto the
fixed non-sample factors: with ``M`` the batch's MTTKRP (``b x R``) and ``G``
the Hadamard product of the factors' Grams (``R x R``), least squares solves
``A G = M``; a nonnegative model solves the same problem under ``A >= 0``
with :func:`scipy.optimize.nnls` per sample (``min ||L^T a - L^{-1} m||``
with ``G = L L^T``, the same objective).

Layouts that capture folded or transposed outputs (``fold_spatial``, token,
sequence-first and channels-last layouts, ``select``) are mapped back before
the edited tensor goes on through the network. Several edits run in one
forward pass: the batch's inputs are repeated, one copy per edit, and the hook
swaps in the edits, so skip connections and every later layer see consistent
batches. :func:`edited_outputs` is the plain entry point (one edit, the
outputs); :func:`peekcore.importance.component_importance` runs every
component's edits and measures them.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._options import SharedOptions
from ._validate import check_device, check_int
from .capture.hooks import refuse_input_dtype
from .capture.layouts import _apply_select, _arrange, _resolve_layout, resolve_layers
from .capture.options import _model_device
from .datasets import as_inputs
from .errors import InvalidArgumentError, InvalidTypeError
from .model import CPModel, solve_sample_rows

__all__ = ["EditOptions", "edited_outputs", "project", "DEFAULT_PASS_BYTES"]

#: Bytes of edited activations sent through one forward pass by default.
DEFAULT_PASS_BYTES = 128 << 20
#: Modules whose outputs are nonnegative by construction: edits are clipped at 0 by default.
_RELU_MODULES = (nn.ReLU, nn.ReLU6)


class _Edits:
    """Forward hook that swaps a layer's output for stacked edits of it.

    For ``g`` edits of a batch of ``b`` samples, the hook returns ``g * b``
    rows, copy-major: for copy ``j``, ``s_j X + (A * C_j) P`` in the layer's own layout,
    with ``A`` the batch's sample-factor rows times the weights (``b x R``),
    ``P`` the components' patterns (``R x prod(I_1..I_d)``), ``s_j`` 0 or 1 and
    ``C_j`` a row of coefficients (``R``): the unedited layer is ``(1, 0)``,
    removing ``r`` is ``(1, -e_r)``, keeping ``r`` alone ``(0, e_r)``. With
    ``expand`` the layer ran on the batch once and the hook multiplies it;
    without, the inputs were repeated ``g`` times and the layer gives ``g``
    identical copies of ``X`` (the first is used).
    """

    def __init__(self, name: str, module: nn.Module, cp: CPModel, settings: dict) -> None:
        self.name = name
        self.module = module
        self.cp = cp
        self.layout = settings["layout"]
        self.select = settings["select"]
        self.fold_spatial = settings["fold_spatial"]
        self.clip = settings["clip"]
        self.nonnegative = settings["nonnegative"]
        self.sample_rows: np.ndarray | None = None  # the model's rows for this batch, if used
        self.a: torch.Tensor | None = None  # b x R for the current batch
        self.batch = 0  # samples in the current batch (before stacking)
        self.expand = False  # the layer ran on the batch once: the hook makes the copies
        self.keep_x: torch.Tensor | None = None
        self.coef: torch.Tensor | None = None  # g x R
        self.patterns: torch.Tensor | None = None  # R x P
        self.resolved: str | None = None
        self.calls = 0  # calls in the current forward pass: a shared module runs more than once

    def new_batch(self, b: int, rows: np.ndarray | None) -> None:
        self.batch, self.sample_rows, self.a = b, rows, None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.coef is None:
            return None
        self.calls += 1
        if self.calls > 1:
            # both calls would be edited with the first one's components: wrong numbers
            raise InvalidArgumentError(
                f"layer {self.name!r} ran twice in one forward pass (a shared module, such as "
                "one nn.ReLU used after two layers?): the edit would replace both outputs. "
                "Give each use its own module, and fit and edit the one you mean"
            )
        t = _apply_select(self.name, output, self.select)
        if self.resolved is None:
            self.resolved = _resolve_layout(self.layout, module, t.ndim)
        g, b = int(self.coef.shape[0]), self.batch
        rows_in = b if self.expand else g * b
        arranged, _ = _arrange(self.name, t, self.resolved, self.fold_spatial, rows_in)
        x = arranged[:b].reshape(b, -1)
        self._check_shape(arranged.shape[1:])
        if not bool(torch.isfinite(x).all()):
            # a NaN would spread through the projection and every edit's logits
            raise InvalidArgumentError(
                f"layer {self.name!r} gives non-finite values (NaN or inf) for "
                f"{int((~torch.isfinite(x)).any(dim=1).sum())} of the {b} samples of a batch: "
                "check the data (NaN in the inputs?) and the network before this layer"
            )
        if self.patterns is None or self.patterns.device != x.device:
            self.patterns = _patterns(self.cp, x.device)
        if self.a is None:
            self.a = self._sample_factors(x)
        pat = self.patterns.to(_compute_dtype(x.dtype))
        parts = (self.a.to(pat.dtype)[None] * self.coef.to(pat)[:, None, :]).reshape(g * b, -1)
        edited = (parts @ pat).reshape(g, b, -1)
        edited += self.keep_x.to(pat)[:, None, None] * x.to(pat.dtype)[None]
        if self.clip:
            edited.clamp_(min=0)
        identity = (self.keep_x == 1) & (self.coef == 0).all(dim=1)
        if bool(identity.any()):
            edited[identity] = x.to(pat.dtype)  # the unedited network, exactly, unclipped
        edited = edited.to(t.dtype).reshape(g * b, *arranged.shape[1:])
        back = _unarrange(edited, t, self.resolved, g * b)
        return _put_back(output, back, self.select, self.name)

    def _check_shape(self, shape: Sequence[int]) -> None:
        want = tuple(self.cp.shape[1:])
        if tuple(shape) == want:
            return
        hint = (
            " It holds the same number of values per sample, so the model was fitted to "
            "another layout of this layer: pass the layout and fold_spatial it was captured "
            "with (or store=, the store it was fitted from)"
            if math.prod(shape) == math.prod(want)
            else " Fit the model to this layer's activations, or name the layer it was fitted to"
        )
        raise InvalidArgumentError(
            f"the CP model was fitted to samples of shape {want}, but layer {self.name!r} gives "
            f"{tuple(shape)} (layout={self.resolved!r}, fold_spatial={self.fold_spatial}).{hint}"
        )

    def _sample_factors(self, x: torch.Tensor) -> torch.Tensor:
        """``b x R`` sample-factor rows times the weights: the model's or a projection."""
        w = torch.as_tensor(self.cp.weights, dtype=torch.float64)
        if self.sample_rows is not None:
            return (torch.as_tensor(self.sample_rows) * w).to(x.device)
        return project(x, self.patterns, nonnegative=self.nonnegative).to(x.device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _patterns(cp: CPModel, device: torch.device) -> torch.Tensor:
    """``R x prod(I_1..I_d)`` float64: each component's outer product ``b_r ∘ c_r ∘ ...``."""
    pat = np.ones((cp.rank, 1))
    for f in cp.factors[1:]:
        pat = (pat[:, :, None] * f.T[:, None, :]).reshape(cp.rank, -1)
    return torch.as_tensor(pat, device=device)


def project(x: torch.Tensor, patterns: torch.Tensor, *, nonnegative: bool) -> torch.Tensor:
    """Sample-factor rows (weights included) of new samples under fixed non-sample factors.

    Parameters
    ----------
    x : torch.Tensor
        ``b x P`` samples, flattened as the model's non-sample modes.
    patterns : torch.Tensor
        ``R x P`` the components' outer products (:func:`_patterns`).
    nonnegative : bool
        Solve under ``A >= 0`` (scipy's NNLS per sample) instead of plain least squares.

    Returns
    -------
    torch.Tensor
        ``b x R`` float64 on the CPU: ``argmin ||x - A patterns||`` per row.
    """
    pat = patterns.to(_compute_dtype(x.dtype))
    m = (x.to(pat.dtype) @ pat.T).to("cpu", torch.float64).numpy()  # b x R: the MTTKRP
    p64 = patterns.to("cpu", torch.float64)
    gram = (p64 @ p64.T).numpy()  # the Hadamard product of the factors' Grams
    return torch.from_numpy(
        np.ascontiguousarray(solve_sample_rows(m, gram, nonnegative=nonnegative))
    )


def _unarrange(edited: torch.Tensor, like: torch.Tensor, layout: str, rows: int) -> torch.Tensor:
    """Undo :func:`peekcore.capture.layouts._arrange`: back to ``like``'s layout and shape."""
    if layout == "tokens":
        return edited.permute(0, 2, 1).contiguous()
    if layout == "sequence_first":
        return edited.permute(2, 0, 1).contiguous()
    if layout == "channels_last":
        shape = (rows, like.shape[-1], *like.shape[1:-1])
        return edited.reshape(shape).movedim(1, -1).contiguous()
    return edited.reshape(rows, *like.shape[1:])


def _put_back(output: Any, edited: torch.Tensor, select: Any, name: str) -> Any:
    """The layer's output with the selected tensor replaced by ``edited``."""
    if select is None:
        return edited
    if isinstance(select, int) and isinstance(output, (tuple, list)):
        items = list(output)
        items[select] = edited
        return type(output)(items) if isinstance(output, list) else tuple(items)
    if isinstance(select, str) and isinstance(output, dict):
        return {**output, select: edited}
    raise InvalidArgumentError(
        f"layer {name!r}: select={select!r} picks a tensor the edit cannot be put back into "
        "(only an int index of a tuple or list, or a key of a dict, can be replaced): hook a "
        "module that returns the tensor itself"
    )


# ---------------------------------------------------------------------- settings


def _settings(layer: str, module: nn.Module, cp: CPModel, options: EditOptions) -> dict[str, Any]:
    """Layout, select, fold_spatial (the store's, if given), clipping and nonnegativity."""
    recorded = {}
    if options.store is not None:
        attrs = _stored_layer(options.store, layer).attrs
        recorded = {k: attrs.get(k) for k in ("layout", "select", "fold_spatial")}
        chosen = recorded["select"]
        if isinstance(chosen, str) and (" [" in chosen or chosen.startswith("<")):
            # a callable, recorded by its description: it cannot be applied again, nor undone
            raise InvalidArgumentError(
                f"layer {layer!r} was captured with a callable select ({chosen}); an edit "
                "cannot be put back through it: capture the module that returns the tensor"
            )
        for key, value in recorded.items():
            given = getattr(options, key)
            if given is not None and given != value and not (key == "layout" and given == "auto"):
                raise InvalidArgumentError(
                    f"{key}={given!r} but the store captured layer {layer!r} with "
                    f"{key}={value!r}: leave {key} out to use the store's"
                )
    clip = options.clip
    if clip is None:
        clip = isinstance(module, _RELU_MODULES)
    method = cp.metadata.get("method")
    nonnegative = method == "ncp" if method in ("cp", "ncp") else _all_nonnegative(cp)
    return {
        "layout": recorded.get("layout") or options.layout or "auto",
        "select": recorded.get("select", options.select),
        "fold_spatial": bool(recorded.get("fold_spatial") or options.fold_spatial),
        "clip": bool(clip),
        "nonnegative": nonnegative,
    }


def _all_nonnegative(cp: CPModel) -> bool:
    return bool(np.all(cp.weights >= 0) and all(np.all(f >= 0) for f in cp.factors))


def _stored_layer(store: Any, layer: str) -> Any:
    from .store import ActivationStore, StoredLayer

    if isinstance(store, StoredLayer):
        if store.name != layer:
            raise InvalidArgumentError(
                f"store= is the stored layer {store.name!r}, but layer={layer!r}: pass the "
                "stored layer the model was fitted to"
            )
        return store
    if isinstance(store, (str, os.PathLike)):
        store = ActivationStore(store)
    if not isinstance(store, ActivationStore):
        raise InvalidTypeError(
            f"store must be an ActivationStore, a stored layer or a store path, got "
            f"{type(store).__name__}"
        )
    return store[layer]


def _load_cp(cp: Any) -> CPModel:
    if isinstance(cp, CPModel):
        return cp
    if isinstance(cp, (str, os.PathLike)):
        path = Path(cp)
        from ._io import open_npz, read_header

        with open_npz(path, "a model or sweep file") as data:
            fmt = read_header(data, path, "a model or sweep file").get("format")
        if fmt == "peekcore.RankSweep":
            from .sweep import RankSweep

            return RankSweep.load(path).model()
        return CPModel.load(path)
    if hasattr(cp, "model") and callable(cp.model):  # a RankSweep: its chosen model
        return cp.model()
    raise InvalidTypeError(
        f"cp must be a CPModel, a RankSweep or the path of a saved one, got {type(cp).__name__}"
    )


def _same_data(store: Any, layer: str, inputs: Any) -> tuple[bool, str | None]:
    """Whether ``inputs`` are the data the store captured, and the rule that said so.

    A store records ``inputs_fingerprint`` (the model inputs alone, in order,
    whatever form they came in and with or without labels): compared when
    present. Stores from before it are compared on ``data_fingerprint`` (inputs
    and labels, so an ``(inputs, labels)`` capture differs from the inputs
    alone). The rule is ``None`` without a store.
    """
    if store is None:
        return False, None
    stored = _stored_layer(store, layer)
    settings = stored.store.attrs.get("settings", {})
    rule = "inputs_fingerprint" if settings.get("inputs_fingerprint") else "data_fingerprint"
    now = inputs.inputs_fingerprint if rule == "inputs_fingerprint" else inputs.fingerprint
    return settings.get(rule) == now and stored.shape[0] == inputs.n_samples, rule


def _use_model_rows(sample_factors: str, cp: CPModel, n: int, same_data: bool) -> bool:
    """Whether the batches' sample-factor rows come from the model (else: a projection)."""
    if sample_factors not in ("auto", "model", "project"):
        raise InvalidArgumentError(
            f"sample_factors must be 'auto', 'model' or 'project', got {sample_factors!r}"
        )
    if sample_factors == "model" and n != cp.shape[0]:
        raise InvalidArgumentError(
            f"sample_factors='model' takes the rows of the model's {cp.shape[0]} fitted samples, "
            f"but the data has {n}: pass the data the model was fitted to, or "
            "sample_factors='project' for new data"
        )
    if sample_factors != "auto":
        return sample_factors == "model"
    return same_data and n == cp.shape[0]


class _Runner:
    """Runs stacked edits of one batch through the network; returns their logits.

    Edits are stacked after the layer where the network allows it (the layers
    before it run once per pass): on the first pass both ways run, and stacking
    after the layer is kept only if it gives the same logits as repeating the
    inputs (a network whose later layers reuse tensors from before the layer,
    such as a skip connection around it, fails that check or raises, and gets
    repeated inputs).
    """

    def __init__(self, model: nn.Module, edits: _Edits, device: torch.device, pass_bytes: int):
        self.model = model
        self.edits = edits
        self.device = device
        self.per_variant: int | None = None  # edits per forward pass, set on the first batch
        self.pass_bytes = pass_bytes
        self.passes = 0  # forward passes whose logits were used
        self.expand: bool | None = None  # stack after the layer (None: not checked yet)
        params = [p for p in model.parameters() if p.is_floating_point()]
        self.input_dtype = params[0].dtype if params else None

    def logits(
        self, x: torch.Tensor, rows: np.ndarray | None, keep_x: Sequence[int], coef: np.ndarray
    ) -> torch.Tensor:
        """``V x b x K`` logits, for edits ``keep_x[v] X + (A * coef[v]) P``."""
        given = x.dtype  # before the conversion below: the dtype an error names
        x = x.to(self.device)
        if self.input_dtype is not None and x.is_floating_point():
            x = x.to(self.input_dtype)
        b = int(x.shape[0])
        self.edits.new_batch(b, rows)
        keep = torch.as_tensor(np.asarray(keep_x, dtype=np.float64), device=self.device)
        c = torch.as_tensor(coef, dtype=torch.float64, device=self.device)
        group = self._group(b)
        out = []
        try:
            for lo in range(0, len(keep), group):
                self.edits.keep_x, self.edits.coef = keep[lo : lo + group], c[lo : lo + group]
                out.append(self._stacked(x, int(self.edits.coef.shape[0]), b))
                self.passes += 1
        except (RuntimeError, TypeError) as err:
            self.edits.keep_x = self.edits.coef = None  # the edit hook idle for the check
            refuse_input_dtype(self.model, x, self.input_dtype, err, given=given)
            raise
        finally:
            self.edits.keep_x = self.edits.coef = None
        return torch.cat(out)

    def _stacked(self, x: torch.Tensor, g: int, b: int) -> torch.Tensor:
        """``g x b x K`` logits of the edits set on the hook."""
        if self.expand is None:
            self.expand = self._check_expand(x, b)
        return self._forward(x, g, b, self.expand)

    def _check_expand(self, x: torch.Tensor, b: int) -> bool:
        """Whether two of the edits give the same logits stacked after the layer as before it."""
        keep, coef = self.edits.keep_x, self.edits.coef
        self.edits.keep_x, self.edits.coef = keep[:2], coef[:2]
        try:
            g = int(self.edits.coef.shape[0])
            want = self._forward(x, g, b, expand=False)
            try:
                got = self._forward(x, g, b, expand=True)
            except Exception:  # later layers combine the copies with tensors from before it
                return False
            # non-finite logits are refused later, with a message; here they must not break atol
            finite = want.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            scale = float(finite.max()) if want.numel() else 0.0
            return bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale, equal_nan=True))
        finally:
            self.edits.keep_x, self.edits.coef = keep, coef

    def _forward(self, x: torch.Tensor, g: int, b: int, expand: bool) -> torch.Tensor:
        self.edits.expand = expand
        self.edits.calls = 0
        y = self.model(x if expand else x.repeat(g, *([1] * (x.ndim - 1))))
        if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != g * b:
            raise InvalidArgumentError(
                f"the model must return logits of shape (batch, classes); it returned "
                f"{_describe(y)} for a batch of {g * b}: wrap it so that it does"
            )
        return y.detach().to(torch.float64).reshape(g, b, -1)

    def _group(self, b: int) -> int:
        """Edits per forward pass: as many as ``pass_bytes`` allow, at least 2."""
        if self.per_variant is None:
            per_sample = math.prod(self.edits.cp.shape[1:]) * 4
            self.per_variant = max(1, per_sample * b)
        return max(2, self.pass_bytes // self.per_variant)


def _describe(y: Any) -> str:
    if isinstance(y, torch.Tensor):
        return f"a tensor of shape {tuple(y.shape)}"
    return f"a {type(y).__name__}"


@dataclass
class EditSetup:
    """What :func:`prepare_edits` checked and built."""

    module: nn.Module
    cp: CPModel
    inputs: Any
    settings: dict[str, Any]
    edits: _Edits
    use_rows: bool  # sample-factor rows from the model, else projected
    runner: _Runner
    same_data: bool  # the store shows the data are what it captured
    data_check: str | None  # the store's fingerprint compared (_same_data); None: no store


@dataclass(frozen=True)
class EditOptions(SharedOptions):
    """How the edited network is run and its layer read: the keywords that
    :func:`~peekcore.importance.component_importance` and :func:`edited_outputs`
    share (shown in their signatures by ``EditOptions.shown_in``).

    Each field means what the argument of the same name of
    :func:`~peekcore.importance.component_importance` means; nothing is checked
    until :func:`prepare_edits`.
    """

    batch_size: int = 64
    device: Any = None
    store: Any = None
    layout: str | None = None
    select: Any = None
    fold_spatial: bool | None = None
    sample_factors: str = "auto"
    clip: bool | None = None
    pass_bytes: int = DEFAULT_PASS_BYTES


def prepare_edits(
    model: nn.Module, layer: str, cp: Any, data: Any, options: EditOptions
) -> EditSetup:
    """Checks and set-up shared by :func:`component_importance` and :func:`edited_outputs`."""
    pass_bytes = check_int(
        options.pass_bytes, "pass_bytes", purpose=" (bytes of edits per forward pass)"
    )
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layer, str):
        raise InvalidTypeError(f"layer must be one layer name (a str), got {layer!r}")
    module = resolve_layers(model, [layer])[layer]
    if isinstance(options.select, dict) and layer in options.select:
        # {layer: selector}, as capture takes it (and its message for a tuple output suggests)
        options = replace(options, select=options.select[layer])
    cp = _load_cp(cp)
    if len(cp.shape) < 2:
        raise InvalidArgumentError(
            f"the CP model has {len(cp.shape)} mode(s); it needs samples + 1"
        )
    device = None if options.device is None else check_device(options.device)
    dev = _model_device(model, device)
    inputs = as_inputs(data, batch_size=options.batch_size, pin_memory=dev.type == "cuda")
    settings = _settings(layer, module, cp, options)
    edits = _Edits(layer, module, cp, settings)
    same, rule = _same_data(options.store, layer, inputs)
    rows = _use_model_rows(options.sample_factors, cp, inputs.n_samples, same)
    runner = _Runner(model, edits, dev, pass_bytes)
    return EditSetup(module, cp, inputs, settings, edits, rows, runner, same, rule)


@contextlib.contextmanager
def hooked(module: nn.Module, model: nn.Module, edits: _Edits) -> Iterator[None]:
    """The edit hook on and the model in eval mode, without autograd; all undone after."""
    modes = [(m, m.training) for m in model.modules()]
    handle = module.register_forward_hook(edits)
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        handle.remove()
        for m, training in modes:
            m.training = training


@EditOptions.shown_in()
def edited_outputs(
    model: nn.Module,
    layer: str,
    cp: Any,
    data: Any,
    *,
    remove: Sequence[int] | None = None,
    keep: Sequence[int] | None = None,
    **options: Any,
) -> np.ndarray:
    """The network's outputs with a set of components removed from ``layer``, or only a set kept.

    Parameters
    ----------
    model, layer, cp, data, batch_size, device, store, layout, select, fold_spatial,
    sample_factors, clip, pass_bytes
        As for :func:`component_importance` (the keywords are :class:`EditOptions`).
    remove : sequence of int, optional
        Components to subtract from the activation (``[]``: the unedited network).
    keep : sequence of int, optional
        Components whose parts alone replace the activation (``[]``: a zero
        activation). Give exactly one of ``remove`` and ``keep``.

    Returns
    -------
    ndarray
        ``N x K`` float64 outputs.
    """
    settings = EditOptions.given_to(edited_outputs, options)  # first: a typo of keep= or remove=
    if (remove is None) == (keep is None):
        raise InvalidArgumentError("give exactly one of remove= and keep= (component indices)")
    setup = prepare_edits(model, layer, cp, data, settings)
    cp, runner = setup.cp, setup.runner
    chosen = list(remove if remove is not None else keep)
    bad = [c for c in chosen if not isinstance(c, int | np.integer) or not 0 <= c < cp.rank]
    if bad:
        raise InvalidArgumentError(
            f"components {bad} are not in 0..{cp.rank - 1} (the model has {cp.rank})"
        )
    coef = np.zeros((1, cp.rank))
    coef[0, chosen] = -1.0 if remove is not None else 1.0
    out = []
    with hooked(setup.module, model, setup.edits):
        for offset, x, _y in setup.inputs.batches(0):
            rows = cp.factors[0][offset : offset + int(x.shape[0])] if setup.use_rows else None
            out.append(runner.logits(x, rows, [int(remove is not None)], coef)[0].cpu().numpy())
    return np.concatenate(out)
