"""capture(): run a model over a data set once and write a layer store, resumably."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._lock import writer_lock
from .._progress import resolve_progress
from .._validate import check_int
from .._version import __version__
from ..datasets import Inputs
from ..errors import CaptureError, DataError
from ..store import (
    ActivationStore,
    StoreError,
    StoreLayout,
    StoreWriter,
    check_replaceable,
    check_store_path,
    is_empty_dir,
    zarr_module,
)
from .hooks import LayerHooks, _batch_rng
from .layouts import _describe_select
from .options import CaptureOptions, Hooked
from .pipeline import _ChunkPipeline

DEFAULT_CHUNK_BYTES = 16 << 20


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


def _progress_bar(progress: bool | None, total: int, initial: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        unit_scale=True,
        desc=desc,
        disable=not resolve_progress(progress),
        dynamic_ncols=True,
    )


# ---------------------------------------------------------------- capture


@CaptureOptions.shown_in()
def capture(
    model: nn.Module,
    data: Any,
    layers: str | Sequence[str],
    store: str | Path,
    *,
    chunk_size: int | None = None,
    check_finite: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
    **options: Any,
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
        Floating-point inputs are converted to the dtype of the model's first
        floating-point parameter (float16 into float32 exactly, float64 into
        float32 rounded, as ``x.float()`` would). Integer and boolean inputs
        are passed as they are (token ids, or a forward that scales images
        itself); a model that refuses them gets an ``InvalidTypeError`` saying
        how to convert them, before a store is created; so does one that takes
        integer indices (an ``nn.Embedding`` first) given floats. Nothing is
        rescaled.
    layers : str or sequence of str
        Module names as ``model.get_submodule`` takes them. A wrong name gets an
        ``UnknownNameError`` (a ``KeyError``) listing the closest names.
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
        empty folder at ``store`` counts as no store. Where ``store`` is a
        symbolic link, the store it points to is resumed or replaced; the link
        stays.
    progress : bool, optional
        Show a progress bar (images per second); default (None): as
        ``PEEKCORE_PROGRESS`` says (``0`` or ``1``) where set, else when stderr is a terminal.

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
    ConcurrentWriteError
        Another process is capturing into ``store`` (it holds the lock
        ``.NAME.lock`` beside it, :mod:`peekcore._lock`); refused before any
        work. Reading a store takes no lock: one still being written reads as
        incomplete (a ``StoreError``) until its capture ends.

    Examples
    --------
    >>> store = peekcore.capture(model, peekcore.datasets.digits(), ["conv1", "conv2"],
    ...                          "digits.zarr", dtype="float32")  # doctest: +SKIP
    >>> peekcore.cp_als(store["conv2"], rank=8)                 # doctest: +SKIP
    """
    opts = CaptureOptions.given_to(capture, options)
    plan = _plan(model, data, layers, Path(store), opts, chunk_size, overwrite)
    with plan.lock:  # held until the capture ends, however it ends
        if plan.writer is not None and plan.writer.complete:
            return ActivationStore(plan.path)
        _run(plan, check_finite, progress)
    return ActivationStore(plan.path)


def _run(plan: _Plan, check_finite: bool, progress: bool | None) -> None:
    """Run the model over the batches not stored yet and write them (the capture's body)."""
    run, start = plan.run, plan.start
    run.hooks.check_finite = check_finite
    sink = _Sink(plan)
    bar = _progress_bar(progress, run.inputs.n_samples, start, "capture")
    try:
        with run.hooks:
            for offset, x, y in run.inputs.batches(start):
                b = int(x.shape[0])
                skip = max(0, start - offset)  # samples of this batch already stored
                dest = sink.slot(b, skip)
                with _batch_rng(run.seed, offset, run.device):
                    acts = run.hooks.run(x, dest)
                if check_finite:
                    _check_finite(run.hooks.finite, offset, run.dtype)
                labels = None if y is None else np.asarray(y)[skip:]
                sink.add(acts, labels, b, skip, dest is not None)
                bar.update(b - skip)
    except BaseException:
        sink.close(raise_error=False)  # keep what was written: a rerun resumes
        raise
    finally:
        bar.close()
    sink.close()


@dataclasses.dataclass
class _Plan:
    """What a :func:`capture` call does: the run, the store's settings, where it starts."""

    path: Path
    run: Hooked
    settings: dict
    provenance: dict
    chunk_size: int | None
    replace: bool  # an existing store at path is replaced once the new one is ready
    writer: StoreWriter | None  # the store being resumed; None: a new one is created
    lock: contextlib.ExitStack  # holds the store's writer lock until closed

    @property
    def start(self) -> int:
        """The first sample still to capture."""
        return 0 if self.writer is None else self.writer.samples_written


def _plan(
    model: nn.Module,
    data: Any,
    layers: Any,
    path: Path,
    opts: CaptureOptions,
    chunk_size: int | None,
    overwrite: bool,
) -> _Plan:
    """Check a :func:`capture` call and decide: a new store, a resumed one, or a replaced one."""
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", purpose=" (samples per stored chunk)")
    if path.is_symlink():
        # the store it names is resumed or replaced (the link stays), as the writer lock
        # beside that store covers every name of it
        path = Path(os.path.realpath(path))
    check_store_path(path)  # before any work: a path under a file can hold no store
    run = opts.hook(model, data, layers)
    writer: StoreWriter | None = None
    lock = contextlib.ExitStack()
    path.parent.mkdir(parents=True, exist_ok=True)  # the lock file goes beside the store
    # the lock before the settings: their inputs_fingerprint reads the data (all of a small
    # data set), and a second writer is refused at once, before that
    lock.enter_context(writer_lock(path, "the store", _WAIT))
    try:
        settings = _settings(model, run, opts)
        # an empty folder is no store (made ahead by the caller); a store to overwrite is
        # replaced only once the first batch ran and the new store is ready
        # (StoreWriter.create)
        replace = os.path.lexists(path) and not is_empty_dir(path) and overwrite
        if replace:
            check_replaceable(path)  # before any work: refuse a folder that is not a store
        elif os.path.lexists(path) and not is_empty_dir(path):
            writer = _resume(path, settings, chunk_size, run.inputs)
    except BaseException:
        lock.close()
        raise
    provenance = {
        "model_class": settings["model_class"],
        "weights_sha256": settings["weights_sha256"],
        "data_source": run.inputs.description,
        "transform": run.inputs.transform,
        "seed": run.seed,
        "device": str(run.device),
        "versions": _versions(),
    }
    return _Plan(path, run, settings, provenance, chunk_size, replace, writer, lock)


def _settings(model: nn.Module, run: Hooked, opts: CaptureOptions) -> dict:
    """What a store records of how it was captured (a resume must match it)."""
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights_sha256": weights_hash(model),
        "layers": run.names,
        "layout": run.layouts,
        "select": {n: _describe_select(s) for n, s in run.selects.items()},
        "fold_spatial": bool(opts.fold_spatial),
        "dtype": run.dtype,
        "batch_size": None if run.inputs.loader is not None else int(opts.batch_size),
        "n_samples": run.inputs.n_samples,
        "data_fingerprint": run.inputs.fingerprint,
        "inputs_fingerprint": run.inputs.inputs_fingerprint,
        "labels_fingerprint": run.inputs.labels_fingerprint,
        "transform": run.inputs.transform,
        "seed": run.seed,
        "autocast": None if run.autocast is None else str(run.autocast).removeprefix("torch."),
    }


_WAIT = (
    "Wait until it has finished (the same call then returns the complete store), or "
    "capture into another store path"
)


class _Sink:
    """Where :func:`capture`'s batches go.

    At the first batch the store is created (or, when resuming, checked
    against it); from then on a :class:`_ChunkPipeline` fills its chunks, with
    batches written straight into the chunk being filled when they fit.
    """

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.writer = plan.writer
        self.pipeline: _ChunkPipeline | None = None

    def slot(self, b: int, skip: int) -> dict[str, torch.Tensor] | None:
        """Where the hooks may write a batch of ``b`` samples directly, if anywhere."""
        if self.pipeline is None or skip:
            return None
        return self.pipeline.slot(b)

    def add(
        self,
        acts: dict[str, torch.Tensor],
        labels: np.ndarray | None,
        b: int,
        skip: int,
        in_slot: bool,
    ) -> None:
        """Take a batch of ``b`` samples whose first ``skip`` are stored already.

        ``in_slot``: the hooks wrote ``acts`` into :meth:`slot`'s views.
        """
        if self.pipeline is None:
            self._start({n: t[skip:].cpu() for n, t in acts.items()}, labels)
        elif in_slot:
            self.pipeline.add(None, labels, b, summed=self.plan.run.hooks.in_place)
        else:
            self.pipeline.add({n: t[skip:].cpu() for n, t in acts.items()}, labels, b - skip)

    def _start(self, host: dict[str, torch.Tensor], labels: np.ndarray | None) -> None:
        plan, run = self.plan, self.plan.run
        if self.writer is None:
            self.writer = _create(
                plan.path,
                run.inputs,
                host,
                labels,
                run.hooks,
                plan.settings,
                plan.provenance,
                run.dtype,
                plan.chunk_size,
                plan.replace,
            )
        else:
            _check_shapes(plan.path, self.writer, host, labels)
        shapes = {n: tuple(t.shape[1:]) for n, t in host.items()}
        self.pipeline = _ChunkPipeline(self.writer, shapes, run.dtype)
        run.hooks.on_block = self.pipeline.extend_checksum
        self.pipeline.add(host, labels, len(next(iter(host.values()))))

    def close(self, raise_error: bool = True) -> None:
        """Finish the writes; with ``raise_error``, refuse a store the data did not fill."""
        if self.pipeline is not None:
            self.pipeline.close(raise_error=raise_error)
        if raise_error and (self.writer is None or not self.writer.complete):
            raise CaptureError(
                f"the data yielded fewer samples than the {self.plan.run.inputs.n_samples} it "
                f"declares; the store {self.plan.path} is incomplete (pass n_samples= to "
                "capture fewer)"
            )


def _check_finite(finite: dict[str, bool], offset: int, dtype: str) -> None:
    for name, ok in finite.items():
        if ok:
            continue
        hint = (
            " (float16 overflows above 65504: capture with dtype='bfloat16' or 'float32')"
            if dtype == "float16"
            else ""
        )
        raise DataError(
            f"layer {name!r} gave NaN or Inf for the batch starting at sample {offset}"
            f"{hint}; pass check_finite=False to store them anyway"
        )


# content checks compared only when the store records them (what differs, for the message):
# a store from before them resumes on data_fingerprint alone, as it did
_IF_RECORDED = {
    "inputs_fingerprint": "the model inputs differ",
    "labels_fingerprint": "the labels differ",
}


def _resume(path: Path, settings: dict, chunk_size: int | None, inputs: Inputs) -> StoreWriter:
    writer = StoreWriter.open(path)
    stored = writer.attrs.get("settings", {})
    _check_items(path, stored, inputs, writer.complete)
    now = _json_round(settings)
    diffs = []
    for key, value in now.items():
        if (key in _IF_RECORDED and key not in stored) or stored.get(key) == value:
            continue
        what = f" ({_IF_RECORDED[key]})" if key in _IF_RECORDED else ""
        diffs.append(f"{key}{what}: store has {stored.get(key)!r}, this call {value!r}")
    if chunk_size is not None and int(chunk_size) != writer.chunk_size:
        diffs.append(f"chunk_size: store has {writer.chunk_size}, this call {chunk_size}")
    if diffs:
        raise StoreError(
            f"the store {path} was captured with other settings, so it cannot be resumed or "
            "reused:\n- " + "\n- ".join(diffs) + "\nPass the same arguments to resume it, "
            "overwrite=True to replace it, or another store path"
        )
    return writer


def _check_items(path: Path, stored: dict, inputs: Inputs, complete: bool) -> None:
    """Refuse data whose items change between reads; say when a store predates content checks.

    A random augmentation gives other inputs on every read, so the samples a
    resumed capture adds would not be those of the data the stored ones came
    from: only a capture in one run is meaningful. A store from before
    ``inputs_fingerprint`` resumes as it did, checked on ``data_fingerprint``,
    which for a generic ``Dataset`` is its class and length alone: said when
    the store is partial (other data would be mixed into it).
    """
    if "inputs_fingerprint" not in stored:
        if inputs.needs_item_prints and not complete:
            warnings.warn(
                f"the store {path} was captured before peekcore recorded the content of the "
                f"inputs, so this resume checks the data by their description only "
                f"({inputs.description}): another data set of that class and length would be "
                "mixed into it. If the data may have changed, pass overwrite=True to capture "
                "again",
                UserWarning,
                stacklevel=5,  # the caller of capture()
            )
        return
    item = inputs.changing_item()
    if item is not None:
        raise StoreError(
            f"the data set gives other values on two reads of item {item} (random "
            "augmentation?): its items change between reads, so the samples a resumed capture "
            f"added would not come from the data that the store {path} holds, and it cannot be "
            "resumed or reused. Pass overwrite=True to capture it again in one run (one pass "
            "over augmented data is fine), or make the transform deterministic (no random "
            "crops, flips or noise, or randomness seeded by the item index)"
        )


def _json_round(obj: Any) -> Any:
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
    layout = StoreLayout(n, chunk_size, dtype, layer_info, label_info, attrs)
    return StoreWriter.create(path, layout, replace=replace)


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
