"""Inputs for activation capture: arrays, torch datasets and loaders, image folders, digits.

:func:`peekcore.capture` and :class:`peekcore.ModelSource` accept any of

- a numpy array or torch tensor of inputs ``(N, ...)``, or a tuple
  ``(inputs, labels)`` of them, or a path to a ``.npy`` file (read by rows,
  :class:`peekcore.npyfile.NpyArray`);
- a torch ``Dataset`` whose items are an input tensor or a tuple
  ``(input, label, ...)``;
- a torch ``DataLoader`` (its batches are used as they come; it must read
  its data set in order: no shuffling, no sampler other than the default
  ``SequentialSampler``); one over an ``IterableDataset`` without a length
  needs ``n_samples=``;
- a path to a folder of images in class subfolders (torchvision's
  ``ImageFolder``; needs torchvision);
- :func:`digits`: scikit-learn's bundled 8 x 8 digits (no download).

Samples are numbered ``0 .. N-1`` in the order the data yields them; those
numbers are the store's ``sample_id``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    default_collate,
)

from ._extras import require
from ._validate import check_int, numeric_labels
from .errors import DataError, InvalidArgumentError, InvalidTypeError, MissingInputError
from .fingerprints import (
    Content,
    array_fingerprint,
    changing_item,
    content_fingerprint,
    describe_callable,
    described_fingerprint,
    transform_repr,
)
from .npyfile import NpyArray, open_npy

__all__ = ["ArrayDataset", "digits", "image_folder", "as_inputs", "Inputs"]


class ArrayDataset(Dataset):
    """A dataset over an array of inputs and optional labels, sliced in batches.

    Parameters
    ----------
    inputs : numpy.ndarray, numpy.memmap, torch.Tensor or peekcore.npyfile.NpyArray
        Shape ``(N, ...)``: one model input per row (e.g. ``N x 3 x 224 x 224``).
    labels : array-like, optional
        Shape ``(N,)`` (or ``(N, ...)``), numeric.
    transform : callable, optional
        Applied to each input row (a tensor) before batching.
    name : str, optional
        Description recorded in the store as the data source.

    Notes
    -----
    Indexing returns ``(input, label)`` when there are labels, else the input.
    Batches are sliced straight from the array (no per-item collation) when
    there is no ``transform``.
    """

    def __init__(
        self,
        inputs: Any,
        labels: Any = None,
        *,
        transform: Callable | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(inputs, (np.ndarray, torch.Tensor, NpyArray)):
            inputs = np.asarray(inputs)
        if inputs.ndim < 1 or inputs.shape[0] == 0:
            raise InvalidArgumentError(
                f"inputs must be an array of shape (N, ...) with N >= 1, got shape "
                f"{tuple(inputs.shape)}"
            )
        if isinstance(inputs.dtype, np.dtype) and inputs.dtype.kind not in "biufc":
            raise InvalidTypeError(
                f"inputs have dtype {inputs.dtype}, which no model takes: give numbers "
                "(bool, integer or float), e.g. a record array's field as x['name'], or "
                "strings converted to token ids first"
            )
        self.inputs = inputs
        if labels is not None:
            if isinstance(labels, torch.Tensor):
                labels = labels.detach().cpu().numpy()
            labels = numeric_labels(np.asarray(labels))
            if labels.shape[0] != inputs.shape[0]:
                raise InvalidArgumentError(
                    f"got {inputs.shape[0]} inputs but {labels.shape[0]} labels; pass one label "
                    "per input row"
                )
        self.labels = labels
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: int) -> Any:
        x = _to_tensor(self.inputs[index])
        if self.transform is not None:
            x = self.transform(x)
        if self.labels is None:
            return x
        return x, _to_tensor(self.labels[index])

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray | None]:
        """Inputs ``start:stop`` as one tensor ``(stop-start, ...)`` and their labels."""
        if self.transform is not None:
            x = torch.stack(
                [self.transform(_to_tensor(self.inputs[i])) for i in range(start, stop)]
            )
        else:
            x = _to_tensor(self.inputs[start:stop])
        y = None if self.labels is None else self.labels[start:stop]
        return x, y

    def description(self) -> str:
        """What the data is, for the store's ``data_source`` attribute."""
        if self.name is not None:
            return self.name
        kind = type(self.inputs).__name__
        return f"{kind} inputs of shape {tuple(self.inputs.shape)}, dtype {self.inputs.dtype}"

    def fingerprint(self) -> str:
        """A hash of the inputs and labels (whole, or sampled rows for large arrays)."""
        return array_fingerprint(self.inputs, self.labels)

    def __repr__(self) -> str:
        return f"ArrayDataset({self.description()}, labels={self.labels is not None})"


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    if not arr.dtype.isnative:  # a big-endian .npy, say: torch takes native byte order only
        arr = arr.astype(arr.dtype.newbyteorder("="), order="C")
    elif not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr)  # memmaps and read-only views: torch wants writable memory
    return torch.from_numpy(arr)


def digits(*, dtype: str = "float32") -> ArrayDataset:
    """scikit-learn's bundled handwritten digits: 1,797 images, 8 x 8, no download.

    Parameters
    ----------
    dtype : str
        Dtype of the images.

    Returns
    -------
    ArrayDataset
        ``inputs`` of shape ``(1797, 1, 8, 8)`` scaled to ``[0, 1]``, ``labels``
        of shape ``(1797,)`` (int64, 0..9).

    Raises
    ------
    ImportError
        When scikit-learn is not installed (``pip install scikit-learn``).
    """
    require(
        "sklearn.datasets",
        "demo",
        "peekcore.datasets.digits() (scikit-learn's bundled digits)",
        package="scikit-learn",
    )
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(dtype)[:, None, :, :]
    return ArrayDataset(images, bunch.target.astype(np.int64), name="sklearn digits (1797 x 8x8)")


def image_folder(path: str | os.PathLike, transform: Callable | None = None) -> Dataset:
    """A folder of images in class subfolders, read with torchvision's ``ImageFolder``.

    Parameters
    ----------
    path : path-like
        ``path/<class>/<image>``, as ``torchvision.datasets.ImageFolder`` expects.
    transform : callable, optional
        Per-image transform; default ``torchvision.transforms.ToTensor()``. Images
        are batched, so give them one size (e.g. ``Resize`` + ``CenterCrop``).

    Returns
    -------
    torch.utils.data.Dataset
        Items ``(image C x H x W, class index)``, in sorted file order.

    Raises
    ------
    ImportError
        When torchvision is not installed.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MissingInputError(f"no such image folder: {folder}")
    # the torchvision build must match torch's (pytorch.org); the extra pins neither
    require("torchvision", "vision", f"reading the image folder {folder}")
    from torchvision import datasets as tv_datasets
    from torchvision import transforms as tv_transforms

    if transform is None:
        transform = tv_transforms.ToTensor()
    return tv_datasets.ImageFolder(str(folder), transform=transform)


# ---------------------------------------------------------------- the input plan


class Inputs:
    """Data to feed a model, in a fixed order, batch by batch (internal to capture).

    Attributes
    ----------
    n_samples : int
        Number of samples ``N`` to use.
    description : str
        What the data is (recorded as the store's ``data_source``).
    fingerprint : str
        Identifies the data (inputs and labels, or how a torch data set is
        described) for resume checks.
    inputs_fingerprint : str
        Identifies the model inputs alone, in order (computed on first use):
        see :meth:`Inputs.inputs_fingerprint`.
    labels_fingerprint : str or None
        Identifies the labels of the same items, or None (computed with
        ``inputs_fingerprint``): see :meth:`Inputs.labels_fingerprint`.
    transform : str or None
        Description of the per-sample transform, if any (:func:`describe_callable`).
    """

    def __init__(
        self,
        data: Any,
        *,
        batch_size: int,
        n_samples: int | None,
        num_workers: int,
        transform: Callable | None,
        pin_memory: bool = False,
    ) -> None:
        self.batch_size = int(batch_size)
        self.num_workers = check_int(
            num_workers, "num_workers", minimum=0, purpose=" (DataLoader worker processes)"
        )
        self.pin_memory = pin_memory
        self.loader: DataLoader | None = None
        self.dataset: Dataset | None = None
        if n_samples is not None:
            n_samples = check_int(n_samples, "n_samples", purpose=" (inputs to read)")
        if isinstance(data, DataLoader):
            if transform is not None:
                raise InvalidArgumentError(
                    "transform= applies to arrays and image folders; with a DataLoader put the "
                    "transform in its Dataset"
                )
            self._init_loader(data, n_samples)
        else:
            self._init_dataset(data, transform)
        if n_samples is not None:
            if n_samples > self.n_samples:
                raise InvalidArgumentError(
                    f"n_samples={n_samples} but the data has only {self.n_samples} samples"
                )
            self.n_samples = int(n_samples)

    # -- set-up

    def _init_loader(self, loader: DataLoader, n_samples: int | None) -> None:
        ds = loader.dataset
        batches = loader.batch_sampler
        batch_size = loader.batch_size
        if isinstance(ds, IterableDataset):  # its own order: DataLoader takes no sampler
            try:
                n: int | None = len(ds)
            except TypeError:
                n = None
            if n is not None and loader.drop_last and batch_size:
                n -= n % int(batch_size)
        else:
            _check_sample_order(loader)
            if batches is None:  # batch_size=None: the sampler's items are the batches
                n = len(loader.sampler)
            else:
                batch_size = batches.batch_size
                n = len(batches.sampler)
                if batches.drop_last:
                    n -= n % int(batch_size)
        if n is None:
            if n_samples is None:
                raise InvalidTypeError(
                    "the DataLoader has no length (an IterableDataset without __len__): pass "
                    "n_samples= to say how many samples to capture"
                )
            n = n_samples
        self.loader = loader
        self.n_samples = int(n)
        self.description = f"DataLoader({_describe_dataset(ds)}, batch_size={batch_size})"
        self.transform = transform_repr(getattr(ds, "transform", None))
        self.fingerprint = _dataset_fingerprint(ds) + f"|loader batch_size={batch_size}"

    def _init_dataset(self, data: Any, transform: Callable | None) -> None:
        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            if path.suffix == ".npy":
                if not path.exists():
                    raise MissingInputError(f"no such input file: {path}")
                # read by rows (a file that shrinks meanwhile gives a DataError, not SIGBUS)
                data = ArrayDataset(open_npy(path, by_sample=True), name=f"{path.name} (npy)")
            else:
                data = image_folder(path, transform)
                transform = None
        if isinstance(data, tuple) and len(data) == 2 and not isinstance(data, Dataset):
            data = ArrayDataset(data[0], data[1], transform=transform)
            transform = None
        elif isinstance(data, (np.ndarray, torch.Tensor)):
            data = ArrayDataset(data, transform=transform)
            transform = None
        if not isinstance(data, Dataset):
            raise InvalidTypeError(
                f"cannot read inputs of type {type(data).__name__}: pass a numpy array or tensor "
                "(N, ...), a tuple (inputs, labels), a .npy path, a torch Dataset or DataLoader, "
                "a folder of images, or peekcore.datasets.digits()"
            )
        if isinstance(data, ArrayDataset) and transform is not None:
            data = ArrayDataset(data.inputs, data.labels, transform=transform, name=data.name)
            transform = None
        if transform is not None:
            raise InvalidArgumentError(
                "transform= applies to arrays and image folders; with a torch Dataset put the "
                "transform in the Dataset"
            )
        try:
            self.n_samples = len(data)
        except TypeError as err:
            raise InvalidTypeError(
                "the Dataset has no length: wrap it in a DataLoader and pass n_samples="
            ) from err
        if self.n_samples == 0:
            raise DataError("the data set is empty: there is nothing to capture")
        self.dataset = data
        self.description = _describe_dataset(data)
        self.transform = transform_repr(getattr(data, "transform", None))
        self.fingerprint = _dataset_fingerprint(data)

    @cached_property
    def _content(self) -> Content:
        """Both content fingerprints, from one read of the items (computed on first use)."""
        n = self.n_samples
        ds = self._indexed()
        if ds is None:  # read only in order: described, as :attr:`fingerprint`
            return Content(f"described:{self.fingerprint}|n={n}", None)
        if isinstance(ds, ArrayDataset):  # rows read without the transform, which is named
            content = content_fingerprint(ds, n, (ds.inputs, ds.labels), ds.transform)
        else:
            content = content_fingerprint(ds, n)
        if self.loader is not None and self.loader.collate_fn is not default_collate:
            inputs = content.inputs + f"|collate_fn={describe_callable(self.loader.collate_fn)}"
            content = content._replace(inputs=inputs)
        return content

    @property
    def inputs_fingerprint(self) -> str:
        """A hash of what the model is given: the first ``n_samples`` inputs, in order.

        Labels play no part, nor does the form the inputs come in: an array, the
        same values as a tensor, a ``.npy`` file, an ``(inputs, labels)`` tuple,
        a map-style ``Dataset`` whose items are those inputs (alone or first in
        a tuple) or an in-order ``DataLoader`` over one all give the same hash.
        Inputs of up to 16 MiB are hashed whole, larger ones by 64 rows spread
        over them, with the count, row shape and dtype. A transform is named
        (an array's ``transform=``) or already in the items (a ``Dataset``'s),
        and a DataLoader's own ``collate_fn`` is named. Data that cannot be
        read by index (an ``IterableDataset``, a DataLoader with
        ``batch_size=None``) get a hash of their description, as
        :attr:`fingerprint`, so they match only themselves. Computed once, on
        first use, with :attr:`labels_fingerprint` (the same item reads).
        """
        return self._content.inputs

    @property
    def labels_fingerprint(self) -> str | None:
        """A hash of the labels of the items :attr:`inputs_fingerprint` reads, or None.

        As a capture stores them (int64 or float64); ``None`` for data without
        labels or read only in order. It tells a generic ``Dataset``'s label
        sets apart, which its :attr:`fingerprint` only describes.
        """
        return self._content.labels

    @property
    def needs_item_prints(self) -> bool:
        """Whether only the content fingerprints (inputs, labels) check this data's content.

        True for a map-style data set read by index other than arrays, tensors
        and ``.npy`` files: its :attr:`fingerprint` is a description.
        """
        ds = self._indexed()
        return ds is not None and not isinstance(ds, ArrayDataset)

    def changing_item(self, probes: int = 8) -> int | None:
        """The first of ``probes`` items spread over the data that reads differently twice.

        Each is read twice (``dataset[i]``) and compared bit for bit, input and
        label: a random augmentation shows here. Arrays without a transform and
        data read only in order are not read (``None``).

        Returns
        -------
        int or None
            The index of the first item whose two reads differ; ``None`` when all agree.
        """
        ds = self._indexed()
        if ds is None or (isinstance(ds, ArrayDataset) and ds.transform is None):
            return None
        return changing_item(ds, self.n_samples, probes)

    def _indexed(self) -> Dataset | None:
        """The map-style data set read by index in order, or None (read only in order)."""
        if self.loader is None:
            return self.dataset
        ds = self.loader.dataset
        if isinstance(ds, IterableDataset) or self.loader.batch_sampler is None:
            return None
        return ds

    # -- iteration

    def batches(self, start: int = 0) -> Iterator[tuple[int, torch.Tensor, np.ndarray | None]]:
        """Batches ``(offset, inputs, labels)`` covering samples ``start .. N-1``.

        Batch boundaries do not depend on ``start``: batches are the same as in a
        pass from sample 0 (the first yielded one may begin before ``start``),
        so a resumed capture runs the model on exactly the same batches.
        """
        if self.loader is not None:
            yield from self._loader_batches(start)
            return
        bs = self.batch_size
        first = (start // bs) * bs
        ds = self.dataset
        if isinstance(ds, ArrayDataset):
            for lo in range(first, self.n_samples, bs):
                hi = min(lo + bs, self.n_samples)
                x, y = ds.batch(lo, hi)
                yield lo, x, y
            return
        subset = Subset(ds, range(first, self.n_samples))
        loader = DataLoader(
            subset,
            batch_size=bs,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        offset = first
        for batch in loader:
            x, y = split_batch(batch)
            yield offset, x, y
            offset += x.shape[0]

    def _loader_batches(self, start: int) -> Iterator[tuple[int, torch.Tensor, np.ndarray | None]]:
        offset = 0
        for batch in self.loader:
            if offset >= self.n_samples:
                break
            x, y = split_batch(batch)
            b = x.shape[0]
            if offset + b > self.n_samples:
                keep = self.n_samples - offset
                x = x[:keep]
                y = None if y is None else y[:keep]
                b = keep
            if offset + b > start:
                yield offset, x, y
            offset += b


def split_batch(batch: Any) -> tuple[torch.Tensor, np.ndarray | None]:
    """Split a collated batch into ``(inputs, labels or None)``.

    Parameters
    ----------
    batch : torch.Tensor or tuple
        ``x`` of shape ``(b, ...)``, or ``(x, y, ...)`` with ``y`` of shape ``(b, ...)``.

    Returns
    -------
    tuple
        ``x`` and ``y`` as a numeric numpy array (int64 or float64), or ``None``.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        y = None
        if len(batch) > 1 and batch[1] is not None:
            label = batch[1]
            y = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else label
            y = numeric_labels(np.asarray(y))
        return batch[0], y
    raise InvalidTypeError(
        f"a data batch is a {type(batch).__name__}; peekcore expects a tensor of inputs or a "
        "tuple (inputs, labels, ...): make the Dataset return (input, label) or wrap it"
    )


def _describe_dataset(ds: Any) -> str:
    if isinstance(ds, ArrayDataset):
        return ds.description()
    root = getattr(ds, "root", None)
    try:
        n = len(ds)
    except TypeError:
        n = "?"
    where = f", root={Path(root).name}" if root is not None else ""
    return f"{type(ds).__module__}.{type(ds).__qualname__}(n={n}{where})"


def _dataset_fingerprint(ds: Any) -> str:
    if isinstance(ds, ArrayDataset):
        return ds.fingerprint()
    return described_fingerprint(_describe_dataset(ds), ds)


def _check_sample_order(loader: DataLoader) -> None:
    """Refuse a DataLoader (over a map-style data set) that does not read it in order.

    Only the ``SequentialSampler`` (``shuffle=False``, no ``sampler``), alone or
    in a plain ``BatchSampler``, gives item ``i`` of the data set as sample ``i``
    in every pass: what the store's sample ids say, and what a resumed capture
    relies on to skip the samples already stored.
    """
    batches = loader.batch_sampler
    if batches is not None and type(batches) is not BatchSampler:
        how = f"makes its batches with a {type(batches).__name__} (batch_sampler=)"
    else:
        sampler = loader.sampler if batches is None else batches.sampler
        name = type(sampler).__name__
        if type(sampler) is SequentialSampler:
            return
        if sampler is not loader.sampler:
            how = f"makes its batches with a BatchSampler over a {name} (batch_sampler=)"
        elif isinstance(sampler, RandomSampler):
            how = "shuffles (shuffle=True, or sampler=RandomSampler)"
        else:
            how = f"draws its samples with a {name} (sampler=)"
    raise InvalidArgumentError(
        f"the DataLoader {how}: capture needs the data in a fixed order, item i of the data "
        "set as sample i, so that the store's sample ids mean something and an interrupted "
        "capture resumes with the samples it has not stored yet. Use a DataLoader with "
        "shuffle=False and no sampler or batch_sampler (its default SequentialSampler); to "
        "capture some items only, pass torch.utils.data.Subset(dataset, indices) instead"
    )


def as_inputs(
    data: Any,
    *,
    batch_size: int,
    n_samples: int | None = None,
    num_workers: int = 0,
    transform: Callable | None = None,
    pin_memory: bool = False,
) -> Inputs:
    """Wrap any supported input data (see the module docstring) as :class:`Inputs`.

    Parameters
    ----------
    data : array, tensor, tuple, path, Dataset or DataLoader
        Inputs ``(N, ...)``, optionally with labels ``(N,)``.
    batch_size : int
        Samples per batch (a DataLoader keeps its own).
    n_samples : int, optional
        Use only the first ``n_samples``.
    num_workers : int
        DataLoader workers for a torch Dataset.
    transform : callable, optional
        Per-sample transform for arrays and image folders.
    pin_memory : bool
        Pin batches (for CUDA models).

    Returns
    -------
    Inputs
    """
    check_int(batch_size, "batch_size", purpose=" (inputs per batch)")
    return Inputs(
        data,
        batch_size=batch_size,
        n_samples=n_samples,
        num_workers=num_workers,
        transform=transform,
        pin_memory=pin_memory,
    )
