"""Activation stores: captured layer activations on disk, in zarr (format 3).

Layout of a store at ``path`` (a folder)::

    path/zarr.json                       root group; its attributes describe the capture
    path/labels                          (N,) int64 or float64, when the data had labels
    path/sample_id                       (N,) int64: index of each sample in the data (one chunk)
    path/layers/<layer>/activations      (N, C, ...) float16, bfloat16 or float32

The activations and labels are chunked along the sample mode only, with the
same number of samples per chunk (``chunk_size``), stored uncompressed with a
CRC32C checksum per chunk; ``sample_id`` is one chunk, written at creation.
Dimensions are named (``sample, channel, y, x``; ``sample, channel, token``
for token outputs), so a layer opens with xarray::

    xr.open_zarr(path, group="layers/layer3", consolidated=False)

bfloat16 has no numpy or zarr type: such arrays hold the raw bfloat16 bit
patterns as uint16 (attribute ``peekcore_dtype = "bfloat16"``); peekcore reads
them back as ``torch.bfloat16``.

The root attributes record the model class, a SHA-256 of its weights, the
layers, the data source, the transform, the seed, the library versions, the
settings of the capture (to check a resumed capture against) and its progress
(``chunks_written`` of ``n_chunks``), and a capture id (``peekcore.capture_id``,
a SHA-256 digest of all of those but the progress: the same for a resumed or
repeated capture, different for another model, data or settings).
``ActivationStore(path)`` refuses a store that is incomplete, whose chunks are
missing, or whose metadata disagrees with its arrays;
:meth:`ActivationStore.verify` also reads every chunk (checksums) and scans for
NaN/Inf. An open store refuses to read on once the store at its path was
replaced (captured again) or changed.

Modules: :mod:`.format` (dtypes on disk, chunk paths, errors, checks of the
metadata), :mod:`.chunkfile` (whole chunk files: encoding, CRC32C, mappings,
``O_DIRECT``, writeback), :mod:`.reader` (:class:`ActivationStore`,
:class:`StoredLayer`) and :mod:`.writer` (:class:`StoreWriter`, replacing and
removing stores). Data flows format -> chunkfile -> reader / writer.
"""

from __future__ import annotations

from .chunkfile import READ_MODES
from .format import (
    FORMAT,
    STORE_DTYPES,
    StoreDamageError,
    StoreError,
    check_store_dtype,
    from_storage,
    is_empty_dir,
    storage_dtype,
    to_storage,
    zarr_module,
)
from .reader import ActivationStore, StoredLayer
from .writer import StoreLayout, StoreWriter, check_replaceable, check_store_path, remove_store

__all__ = [
    "ActivationStore",
    "StoredLayer",
    "StoreError",
    "StoreDamageError",
    "STORE_DTYPES",
    # used by capture and the command line
    "FORMAT",
    "READ_MODES",
    "StoreLayout",
    "StoreWriter",
    "check_replaceable",
    "check_store_path",
    "check_store_dtype",
    "from_storage",
    "is_empty_dir",
    "remove_store",
    "storage_dtype",
    "to_storage",
    "zarr_module",
]
