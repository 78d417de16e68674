"""What the network does with a component: causal importance of CP components for its outputs.

A CP model of a layer says what the layer's activations are made of; this
module asks whether the rest of the network uses each part. A forward hook on
the layer (:mod:`peekcore.edits`) replaces its output, batch by batch, by an
edited activation, and the network's logits are compared:

- ``"remove"``: the activation minus component ``r``'s part of the model,
  ``X - a_r ∘ b_r ∘ c_r`` for the batch's samples; the change is measured
  against the unedited network;
- ``"keep"``: component ``r``'s part alone; the change is measured against
  the network with the layer's output set to zero (what the component adds on
  its own);
- the full reconstruction (all ``R`` components) is the baseline that says how
  much of the network's behaviour the rank-``R`` model keeps at all.

Sample-factor rows come from the fitted model for the samples it was fitted
to, else from a least-squares (nonnegative least-squares for a nonnegative
model) projection onto the fixed non-sample factors (see
:mod:`peekcore.edits`). Only one batch of the layer is held, plus the edited
copies that go through the network together: at most ``pass_bytes`` of them
per forward pass, and at least two, so a batch takes at most ``R + 2`` passes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import load_npz, save_npz
from .edits import EditOptions, hooked, prepare_edits
from .errors import InvalidArgumentError, InvalidTypeError

__all__ = ["ComponentImportance", "component_importance", "MODES"]

MODES = ("remove", "keep")
FORMAT = "peekcore.ComponentImportance"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------- result


@dataclass
class ComponentImportance:
    """Causal importance of each component of a CP model for the network's outputs.

    Attributes
    ----------
    layer : str
        The edited layer.
    modes : tuple of str
        ``"remove"`` and/or ``"keep"``.
    logit_change : dict of str to ndarray
        Per mode, ``R x K``: mean over samples of the change in each class's
        logit (remove: against the unedited network; keep: against the layer
        set to zero).
    probability_change : dict of str to ndarray
        Per mode, ``R x K``: the same for softmax probabilities.
    accuracy_change : dict of str to ndarray
        Per mode, ``R``: accuracy of the edited network minus the unedited
        network's (NaN without labels).
    baseline_accuracy : float
        The unedited network's accuracy (NaN without labels).
    reconstruction_accuracy : float
        Accuracy with the layer replaced by the full rank-``R`` reconstruction.
    reconstruction_agreement : float
        Share of samples whose top class under the reconstruction is the
        unedited network's.
    reconstruction_logit_error : float
        ``||L_rec - L|| / ||L||`` over all samples and classes.
    zero_accuracy : float
        Accuracy with the layer's output set to zero (NaN unless ``"keep"`` ran).
    n_samples : int
    metadata : dict
        Settings and provenance (layout, sample factors, clipping, passes, seconds).
    """

    layer: str
    modes: tuple[str, ...]
    logit_change: dict[str, np.ndarray]
    probability_change: dict[str, np.ndarray]
    accuracy_change: dict[str, np.ndarray]
    baseline_accuracy: float
    reconstruction_accuracy: float
    reconstruction_agreement: float
    reconstruction_logit_error: float
    zero_accuracy: float
    n_samples: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.logit_change[self.modes[0]].shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.logit_change[self.modes[0]].shape[1])

    def effect(self, mode: str | None = None) -> np.ndarray:
        """``R x K`` how much each component drives each class's logit (larger: drives more).

        ``-logit_change["remove"]`` (removing a component that drives a class
        lowers its logit) or ``+logit_change["keep"]``; ``mode`` defaults to
        the first mode computed.
        """
        mode = self._mode(mode)
        sign = -1.0 if mode == "remove" else 1.0
        return sign * self.logit_change[mode]

    def top_classes(self, component: int, k: int = 3, mode: str | None = None) -> list[int]:
        """The ``k`` classes component ``component`` drives most (by :meth:`effect`)."""
        if not 0 <= int(component) < self.rank:
            raise InvalidArgumentError(
                f"component {component} is out of range for {self.rank} components: use "
                f"0..{self.rank - 1}"
            )
        row = self.effect(mode)[int(component)]
        return [int(c) for c in np.argsort(-row, kind="stable")[: max(1, int(k))]]

    def table(self, k: int = 3, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One row per component: the classes it drives most and its accuracy changes.

        Parameters
        ----------
        k : int
            Classes listed per component and mode, with their mean logit change.
        class_names : sequence of str, optional
            Display names by class index (default the indices).
        """
        names = [str(c) for c in range(self.n_classes)] if class_names is None else class_names
        rows = []
        for r in range(self.rank):
            row: dict[str, Any] = {"component": r}
            for mode in self.modes:
                change = self.logit_change[mode][r]
                top = self.top_classes(r, k, mode)
                row[f"drives ({mode})"] = ", ".join(f"{names[c]} ({change[c]:+.3g})" for c in top)
                row[f"accuracy change ({mode})"] = float(self.accuracy_change[mode][r])
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """Scalars worth quoting: accuracies, agreement, sizes."""
        return {
            "layer": self.layer,
            "components": self.rank,
            "classes": self.n_classes,
            "n_samples": self.n_samples,
            "baseline_accuracy": self.baseline_accuracy,
            "reconstruction_accuracy": self.reconstruction_accuracy,
            "reconstruction_agreement": self.reconstruction_agreement,
            "reconstruction_logit_error": self.reconstruction_logit_error,
            "zero_accuracy": self.zero_accuracy,
        }

    def _mode(self, mode: str | None) -> str:
        mode = self.modes[0] if mode is None else mode
        if mode not in self.modes:
            raise InvalidArgumentError(
                f"mode {mode!r} was not computed; this result has {self.modes}"
            )
        return mode

    def __repr__(self) -> str:
        return (
            f"ComponentImportance(layer={self.layer!r}, components={self.rank}, "
            f"classes={self.n_classes}, modes={self.modes}, n_samples={self.n_samples}, "
            f"reconstruction_accuracy={self.reconstruction_accuracy:.4f})"
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the result to an ``.npz`` file atomically."""
        arrays: dict[str, np.ndarray] = {}
        for mode in self.modes:
            arrays[f"logit_change_{mode}"] = self.logit_change[mode]
            arrays[f"probability_change_{mode}"] = self.probability_change[mode]
            arrays[f"accuracy_change_{mode}"] = self.accuracy_change[mode]
        scalars = {k: v for k, v in self.summary().items() if k.endswith(("accuracy", "ment"))}
        arrays["scalars"] = np.array([scalars[k] for k in sorted(scalars)], dtype=np.float64)
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "layer": self.layer,
            "modes": list(self.modes),
            "scalars": sorted(scalars) + ["reconstruction_logit_error"],
            "n_samples": self.n_samples,
            "metadata": self.metadata,
        }
        arrays["scalars"] = np.append(arrays["scalars"], self.reconstruction_logit_error)
        save_npz(path, arrays, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ComponentImportance:
        """Read a result written by :meth:`save`."""
        header, data = load_npz(path, FORMAT, "component importance")
        modes = tuple(header["modes"])
        scalars = dict(zip(header["scalars"], data["scalars"].tolist(), strict=True))
        return cls(
            layer=header["layer"],
            modes=modes,
            logit_change={m: data[f"logit_change_{m}"] for m in modes},
            probability_change={m: data[f"probability_change_{m}"] for m in modes},
            accuracy_change={m: data[f"accuracy_change_{m}"] for m in modes},
            n_samples=int(header["n_samples"]),
            metadata=header["metadata"],
            **scalars,
        )


def _check_modes(modes: Any) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = (modes,)
    modes = tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if not modes or bad or len(set(modes)) != len(modes):
        raise InvalidArgumentError(
            f"modes must be one or both of {MODES}, each once; got {modes!r}"
        )
    return modes


def _check_labels(labels: Any, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise InvalidArgumentError(
            f"labels must be one class index per sample, shape ({n},); got shape {arr.shape}"
        )
    if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise InvalidTypeError(f"labels must be integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _in_range(labels: np.ndarray, logits: torch.Tensor) -> np.ndarray:
    """``labels``, refused unless every one indexes one of the network's classes."""
    k = int(logits.shape[2])
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise InvalidArgumentError(
            f"labels must be class indices 0..{k - 1} (the network gives {k} logits); got "
            f"values from {labels.min()} to {labels.max()}"
        )
    return labels


def _edit_plan(rank: int, modes: tuple[str, ...]) -> tuple[list[int], np.ndarray, int]:
    """The edits of every batch: ``keep_x`` (0/1 each), coefficients (edits x R), and the
    index of the first per-component edit.

    Edit 0 is the network, 1 the full reconstruction, 2 the zeroed layer (with
    ``"keep"``), then ``R`` edits per mode in component order.
    """
    keep_x, coef = [1, 0], [np.zeros(rank), np.ones(rank)]
    if "keep" in modes:
        keep_x, coef = [*keep_x, 0], [*coef, np.zeros(rank)]
    first = len(keep_x)
    for mode in modes:
        keep_x += [1 if mode == "remove" else 0] * rank
        coef += list((-1.0 if mode == "remove" else 1.0) * np.eye(rank))
    return keep_x, np.stack(coef), first


@EditOptions.shown_in()
def component_importance(
    model: nn.Module,
    layer: str,
    cp: Any,
    data: Any,
    *,
    labels: Any = None,
    modes: Sequence[str] = MODES,
    **options: Any,
) -> ComponentImportance:
    """Causal importance of each CP component of ``layer`` for the network's class logits.

    The keywords but ``labels`` and ``modes`` are :class:`peekcore.edits.EditOptions`,
    which :func:`peekcore.edited_outputs` takes too.

    Parameters
    ----------
    model : torch.nn.Module
        The network; it returns logits ``(batch, classes)``. Run in eval mode
        under ``torch.inference_mode`` (its training flags are restored).
    layer : str
        The module whose output the CP model was fitted to (``get_submodule`` name).
    cp : CPModel, RankSweep or path
        A CP or nonnegative CP model of that layer's activations, as captured
        (same layout); a sweep gives its chosen model.
    data : array, tensor, tuple, path, Dataset or DataLoader
        Network inputs, as for :func:`peekcore.capture`.
    labels : array-like, optional
        ``N`` integer classes for the accuracies (default: the data's own, if any).
    batch_size : int
        Samples per batch (a DataLoader keeps its own).
    device : str or torch.device, optional
        Run there (the model is moved); default where the model's parameters are.
    modes : sequence of {"remove", "keep"}
    store : ActivationStore, stored layer or path, optional
        The store the model was fitted from: its capture settings (layout,
        select, fold_spatial) are used, and with ``sample_factors="auto"`` its
        rows are taken from the model when ``data`` is the captured data: the
        same model inputs in the same order, in any form and with or without
        labels (the store's ``inputs_fingerprint``; a store captured before
        peekcore recorded it is compared on its ``data_fingerprint``, inputs
        and labels together, so there the labels must ride along as they did
        in the capture).
    layout, select, fold_spatial : optional
        How the layer was captured, when no store is given (defaults ``"auto"``,
        ``None``, ``False``); ``select`` may also be ``{layer: selector}``, as
        :func:`peekcore.capture` takes it.
    sample_factors : {"auto", "model", "project"}
        Where a batch's sample-factor rows come from: the fitted model
        (``"model"``: data must be the fitted samples, in order), a projection
        onto the fixed non-sample factors (``"project"``: least squares, or
        NNLS for a nonnegative model), or ``"auto"`` (the model's rows when the
        store shows ``data`` is what it was fitted to, else projection).
    clip : bool, optional
        Clip edited activations at zero. Default: yes for ``nn.ReLU`` /
        ``nn.ReLU6`` layers, whose outputs the rest of the network has never
        seen negative (removing a component can undershoot zero); no
        otherwise. Clipping makes the edits nonlinear: remove ``r`` plus keep
        ``r`` no longer adds up to the activation.
    pass_bytes : int
        Bytes of edited activations sent through one forward pass (at least
        two edits per pass, so a batch takes at most ``R + 2`` passes).

    Returns
    -------
    ComponentImportance
        Its ``metadata`` says where the rows came from (``"sample_factors"``:
        ``"model"`` or ``"project"``) and what decided it: ``"data_check"`` is
        the store fingerprint compared (``"inputs_fingerprint"``, or
        ``"data_fingerprint"`` for an older store; ``None`` without a store)
        and ``"same_data"`` its answer.

    Raises
    ------
    UnknownNameError
        No such layer (closest names listed).
    InvalidArgumentError
        The layer's shape (after the layout) is not the model's, the model's
        output is not ``(batch, classes)`` logits, or bad options.
    """
    modes = _check_modes(modes)
    opts = EditOptions.given_to(component_importance, options)
    t0 = time.perf_counter()
    # absolute: the report matches it to its model files from whatever folder it runs in
    source = os.path.abspath(os.fspath(cp)) if isinstance(cp, (str, os.PathLike)) else None
    setup = prepare_edits(model, layer, cp, data, opts)
    cp, inputs, use_rows = setup.cp, setup.inputs, setup.use_rows
    given = _check_labels(labels, inputs.n_samples)
    rank = cp.rank
    keep_x, coefs, first = _edit_plan(rank, modes)
    acc = _Accumulator(len(keep_x))
    with hooked(setup.module, model, setup.edits):
        for offset, x, y in inputs.batches(0):
            b = int(x.shape[0])
            rows = cp.factors[0][offset : offset + b] if use_rows else None
            logits = setup.runner.logits(x, rows, keep_x, coefs)
            lab = given[offset : offset + b] if given is not None else y
            acc.add(logits, None if lab is None else _in_range(_check_labels(lab, b), logits))
    meta = {
        **{k: v for k, v in setup.settings.items() if k != "select" or not callable(v)},
        "sample_factors": "model" if use_rows else "project",
        "data_check": setup.data_check,
        "same_data": setup.same_data if setup.data_check else None,
        "batch_size": int(opts.batch_size),
        "forward_passes": setup.runner.passes,
        "stacked_after_layer": bool(setup.runner.expand),
        "seconds": time.perf_counter() - t0,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "cp_shape": list(cp.shape),
        "rank": rank,
        "result": source,
    }
    return acc.result(layer, modes, rank, first, meta)


def _edit_name(finite: torch.Tensor) -> str:
    """Which edit first gave non-finite logits, in words (edit order of :func:`_edit_plan`)."""
    v = int(torch.nonzero(~finite)[0, 0])
    names = ["the unedited network", "the full reconstruction"]
    return names[v] if v < 2 else f"edit {v} (the zeroed layer, or a component removed or kept)"


class _Accumulator:
    """Sums over samples of each edit's logits, probabilities and correct answers.

    Mean changes are differences of means, so sums are all a batch leaves behind.
    Edit 0 is the unedited network, 1 the full reconstruction, 2 the zeroed
    layer (when ``"keep"`` runs).
    """

    def __init__(self, n_edits: int) -> None:
        self.n_edits = n_edits
        self.n = 0
        self.logits: np.ndarray | None = None  # V x K
        self.probs: np.ndarray | None = None  # V x K
        self.correct = np.zeros(n_edits)
        self.labelled = True
        self.agree = 0
        self.sq_diff = 0.0
        self.sq_base = 0.0

    def add(self, logits: torch.Tensor, labels: np.ndarray | None) -> None:
        """One batch: ``V x b x K`` float64 logits and ``b`` labels (or None)."""
        finite = torch.isfinite(logits).all(dim=2).all(dim=1)  # V
        if not bool(finite.all()):
            raise InvalidArgumentError(
                f"the network's logits are not finite (NaN or inf) under {_edit_name(finite)}: "
                "importance needs finite logits; check the layers after the edited one (a log "
                "or division of an edited activation?) and try clip=True"
            )
        if self.logits is None:
            k = int(logits.shape[2])
            self.logits, self.probs = np.zeros((self.n_edits, k)), np.zeros((self.n_edits, k))
        self.n += int(logits.shape[1])
        self.logits += logits.sum(dim=1).cpu().numpy()
        self.probs += torch.softmax(logits, dim=2).sum(dim=1).cpu().numpy()
        top = logits.argmax(dim=2).cpu().numpy()  # V x b
        self.agree += int(np.sum(top[1] == top[0]))
        self.sq_diff += float(((logits[1] - logits[0]) ** 2).sum())
        self.sq_base += float((logits[0] ** 2).sum())
        if labels is None:
            self.labelled = False
        else:
            self.correct += np.sum(top == labels[None, :], axis=1)

    def result(
        self, layer: str, modes: tuple[str, ...], rank: int, first: int, meta: dict
    ) -> ComponentImportance:
        mean_logit, mean_prob = self.logits / self.n, self.probs / self.n
        accuracy = self.correct / self.n if self.labelled else np.full(self.n_edits, np.nan)
        logit, prob, acc = {}, {}, {}
        for i, mode in enumerate(modes):
            idx = slice(first + i * rank, first + (i + 1) * rank)
            ref = 0 if mode == "remove" else 2  # the unedited network / the zeroed layer
            logit[mode] = mean_logit[idx] - mean_logit[ref]
            prob[mode] = mean_prob[idx] - mean_prob[ref]
            acc[mode] = accuracy[idx] - accuracy[0]
        return ComponentImportance(
            layer=layer,
            modes=modes,
            logit_change=logit,
            probability_change=prob,
            accuracy_change=acc,
            baseline_accuracy=float(accuracy[0]),
            reconstruction_accuracy=float(accuracy[1]),
            reconstruction_agreement=self.agree / self.n,
            reconstruction_logit_error=math.sqrt(self.sq_diff / max(self.sq_base, 1e-300)),
            zero_accuracy=float(accuracy[2]) if "keep" in modes else float("nan"),
            n_samples=self.n,
            metadata=meta,
        )
