"""Writing a store: creation, chunk by chunk writes with progress, replacing and removing."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InternalError, OutputExistsError, OutputPathError
from .chunkfile import _file_crc, _write_chunk_file, _writes_directly
from .format import (
    _BF16_NAN_BITS,
    FORMAT,
    StoreError,
    _array_keys,
    _check_arrays,
    _chunk_path,
    _chunk_records,
    _layer_group,
    _n_chunks,
    _open_root,
    _zarr,
    is_empty_dir,
    storage_dtype,
)

PROGRESS_EVERY_S = 0.2  # progress is recorded after a chunk at most this often (and at the end)
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr's temporary files of unfinished writes


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


class StoreWriter:
    """Writes a store chunk by chunk and records progress after each (internal to capture).

    A chunk ``k`` (samples ``k*chunk_size ..``) is written to every array, then
    the root attribute ``progress.chunks_written`` is advanced (at most every
    ``PROGRESS_EVERY_S`` seconds, and after the last chunk). Every file is
    replaced atomically (temporary file, rename), so after a crash the store
    holds whole files and ``chunks_written`` never counts a chunk that is not on
    disk; a resumed capture rewrites everything from there. Each whole chunk
    file's writeback to disk starts as soon as it is complete (``WRITE_BEHIND``).

    With the progress, the CRC32C of every chunk written is recorded per array
    (``progress["crc32c"]``, :func:`~peekcore.store.format._chunk_records`), so
    that a reader can tell a chunk file from the one written at its place.
    """

    def __init__(self, path: Path, root: Any, attrs: dict) -> None:
        self.path = path
        self.root = root
        self.attrs = attrs
        self.n_samples = int(attrs["n_samples"])
        self.chunk_size = int(attrs["chunk_size"])
        self.n_chunks = _n_chunks(attrs)
        self.chunks_written = int(attrs["progress"]["chunks_written"])
        self.layers = list(attrs["layers"])
        self._acts = {name: root[_layer_group(name) + "/activations"] for name in self.layers}
        self._labels = root["labels"] if attrs["has_labels"] else None
        self._direct = {name: _writes_directly(arr) for name, arr in self._acts.items()}
        self._extra = []
        if self._labels is not None:
            self._extra.append(("labels", self._labels, _writes_directly(self._labels)))
        self.np_dtypes = {name: np.dtype(arr.dtype) for name, arr in self._acts.items()}
        self._recorded_at = -math.inf
        records = _chunk_records(path, attrs)
        if records is None:  # a store from before chunk records: read them from its files
            records = {
                key: [
                    _file_crc(_chunk_path(path / key, i, root[key].ndim))
                    for i in range(1 if key == "sample_id" else self.chunks_written)
                ]
                for key in _array_keys(attrs)
            }
        self.records = records

    @property
    def complete(self) -> bool:
        return self.chunks_written == self.n_chunks

    @property
    def samples_written(self) -> int:
        return min(self.chunks_written * self.chunk_size, self.n_samples)

    @classmethod
    def create(cls, path: Path, layout: StoreLayout, *, replace: bool = False) -> StoreWriter:
        """Create an empty store (all metadata, no chunks) atomically.

        The store is built in a temporary folder beside ``path`` and renamed, so
        ``path`` either does not exist or holds complete metadata; the root
        attributes get a capture id, a digest of the capture's settings and
        provenance (:meth:`StoreLayout.root_attributes`). An empty folder at
        ``path`` is taken as no store. ``replace``: a store at ``path`` is
        replaced (:func:`check_replaceable`), only now that the new one is
        ready: it is renamed aside, the new one renamed in, and then it is
        deleted.
        """
        zarr = _zarr()
        from zarr.codecs import Crc32cCodec

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.creating"
        if tmp.exists():
            shutil.rmtree(tmp)
        root_attrs = layout.root_attributes()
        n_samples, chunk_size, dtype = layout.n_samples, layout.chunk_size, layout.dtype
        label_info = layout.label_info
        common = {
            "compressors": (Crc32cCodec(),),
            "filters": None,
            "config": {"write_empty_chunks": True},
            "chunk_key_encoding": {"name": "default", "separator": "/"},
        }
        try:
            root = zarr.open_group(tmp, mode="w-", attributes=root_attrs, zarr_format=3)
            group = root.create_group("layers")
            fill = np.float32("nan") if dtype != "bfloat16" else _BF16_NAN_BITS
            for name, info in layout.layers.items():
                shape = tuple(int(s) for s in info["shape"])
                group.create_group(name).create_array(
                    "activations",
                    shape=(n_samples, *shape),
                    dtype=storage_dtype(dtype),
                    chunks=(chunk_size, *shape),
                    fill_value=fill,
                    dimension_names=tuple(info["dims"]),
                    attributes=_json({**info.get("attrs", {}), "peekcore_dtype": dtype}),
                    **common,
                )
            ids = root.create_array(
                "sample_id",
                shape=(n_samples,),
                dtype=np.int64,
                chunks=(n_samples,),
                fill_value=-1,
                dimension_names=("sample",),
                **common,
            )
            ids[:] = np.arange(n_samples, dtype=np.int64)
            records: dict[str, list[int]] = {
                _layer_group(name) + "/activations": [] for name in layout.layers
            }
            records["sample_id"] = [_file_crc(_chunk_path(tmp / "sample_id", 0, 1))]
            if label_info is not None:
                lshape = tuple(label_info["shape"])
                ldtype = np.dtype(label_info["dtype"])
                root.create_array(
                    "labels",
                    shape=(n_samples, *lshape),
                    dtype=ldtype,
                    chunks=(chunk_size, *lshape),
                    fill_value=-1 if ldtype.kind == "i" else np.nan,
                    dimension_names=("sample", *(f"label_{i}" for i in range(len(lshape)))),
                    **common,
                )
                records["labels"] = []
            progress = {**root_attrs["progress"], "crc32c": records}
            root.attrs.update({"progress": progress})
            _move_in(tmp, path, replace)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            clear = _no_room_error(err, path, resumable=False)
            if clear is not None:
                raise clear from err
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> StoreWriter:
        """Open a store to resume writing it: check it, drop unfinished temporary files."""
        for leftover in path.rglob("*.partial"):
            if _PARTIAL.search(leftover.name):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        root, attrs = _open_root(path, mode="r+")
        done = int(attrs["progress"].get("chunks_written", -1))
        if not 0 <= done <= _n_chunks(attrs):
            raise StoreError(
                f"{path}: progress says {done} of {_n_chunks(attrs)} chunks written; the "
                "metadata is damaged: capture again with overwrite=True"
            )
        _check_arrays(path, root, attrs, upto=done)
        return cls(path, root, attrs)

    @property
    def direct(self) -> bool:
        """Whether whole chunks are written as files directly (zarr's encoding, fewer copies)."""
        return all(self._direct.values())

    def write_chunk(
        self,
        index: int,
        activations: Mapping[str, np.ndarray],
        labels: np.ndarray | None,
        checksums: Mapping[str, int] | None = None,
    ) -> None:
        """Write chunk ``index`` of every array, then record it as written.

        A disk that is full (or a file size limit reached) gives an
        :class:`~peekcore.errors.OutputPathError` that says so; the chunks
        written before stay, and a capture with the same arguments resumes.

        Parameters
        ----------
        index : int
            Must be ``chunks_written`` (chunks are written in order).
        activations : mapping of layer -> ndarray
            ``(b, *shape)`` in the storage dtype, ``b`` the chunk's sample count.
        labels : ndarray or None
            ``(b, ...)`` when the store has labels.
        checksums : mapping of layer -> int, optional
            CRC32C of each layer's chunk bytes, when the caller computed them.
        """
        if index != self.chunks_written:
            raise InternalError(
                f"chunk {index} written out of order (next is {self.chunks_written})"
            )
        lo = index * self.chunk_size
        hi = min(lo + self.chunk_size, self.n_samples)
        whole = hi - lo == self.chunk_size
        checksums = checksums or {}
        with _room_to_write(self.path, resumable=True):
            for name in self.layers:
                data, key = activations[name], _layer_group(name) + "/activations"
                if self._direct[name] and whole:
                    at = (self.path / key, index, data, self.np_dtypes[name], checksums.get(name))
                    crc = _write_chunk_file(*at)
                else:  # zarr pads the last, partial chunk with the fill value
                    self._acts[name][lo:hi] = data
                    crc = _file_crc(_chunk_path(self.path / key, index, data.ndim))
                self._record(key, index, crc)
            for key, array, direct in self._extra:
                if whole and direct:
                    crc = _write_chunk_file(self.path / key, index, labels, np.dtype(array.dtype))
                else:
                    array[lo:hi] = labels
                    crc = _file_crc(_chunk_path(self.path / key, index, labels.ndim))
                self._record(key, index, crc)
        self.chunks_written = index + 1
        now = time.monotonic()
        if self.complete or now - self._recorded_at >= PROGRESS_EVERY_S:
            self.record_progress()
            self._recorded_at = now

    def _record(self, key: str, index: int, crc: int) -> None:
        """Keep chunk ``index``'s CRC32C as array ``key``'s record (recorded with progress)."""
        del self.records[key][index:]  # records of chunks written before a crash, again
        self.records[key].append(int(crc))

    def record_progress(self) -> None:
        """Record ``chunks_written`` and the chunks' CRC32C records in the root metadata, in
        one atomic replacement of the file (zarr's)."""
        done = self.chunks_written
        records = {k: v[: 1 if k == "sample_id" else done] for k, v in self.records.items()}
        progress = {"chunks_written": done, "n_chunks": self.n_chunks, "crc32c": records}
        with _room_to_write(self.path, resumable=True):
            self.root.attrs.update({"progress": progress})


# what a write that found no room says: the disk (or the user's quota) is full, or the
# file size limit (RLIMIT_FSIZE, ulimit -f) was reached
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _no_room_error(err: BaseException, path: Path, resumable: bool) -> OutputPathError | None:
    """The clear error for ``err`` when it says a write of store ``path`` found no room,
    else None.

    numpy's ``tofile`` reports a short write without an errno ("N requested and
    M written"); a short write of a regular file means no room too.
    """
    if not isinstance(err, OSError) or isinstance(err, OutputPathError):
        return None
    short = err.errno is None and re.search(r"\d+ requested and \d+ written", str(err))
    if err.errno not in _NO_ROOM and not short:
        return None
    if resumable:
        then = (
            "the chunks written before are kept: free space (or raise the limit) and call "
            "capture again with the same arguments to resume"
        )
    else:
        then = "nothing was written there: free space (or raise the limit) and capture again"
    return OutputPathError(
        f"writing the store {path} failed: the disk or quota is full, or a file size limit "
        f"(ulimit -f) was reached ({type(err).__name__}: {err}); {then}"
    )


@contextlib.contextmanager
def _room_to_write(path: Path, resumable: bool) -> Iterator[None]:
    """Turn a write of store ``path`` that finds no room into a clear OutputPathError."""
    try:
        yield
    except OSError as err:
        clear = _no_room_error(err, path, resumable)
        if clear is None:
            raise
        raise clear from err


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """What a new store holds: sizes, dtype, layers, labels and attributes.

    Attributes
    ----------
    n_samples : int
    chunk_size : int
        Samples per stored chunk.
    dtype : str
        Store dtype of the activations.
    layers : dict of name -> dict
        ``layers[name]`` has ``shape`` (per sample), ``dims`` and ``attrs``.
    label_info : dict or None
        ``shape`` (per sample) and ``dtype`` of the labels; None: no labels.
    attrs : dict
        More root attributes (provenance, settings).
    """

    n_samples: int
    chunk_size: int
    dtype: str
    layers: Mapping[str, Mapping[str, Any]]
    label_info: Mapping[str, Any] | None
    attrs: Mapping[str, Any]

    def root_attributes(self) -> dict:
        """The root attributes of the new store, capture id included."""
        label_info = self.label_info
        root_attrs = {
            "peekcore": {"kind": "activation store", "format": FORMAT},
            "n_samples": int(self.n_samples),
            "chunk_size": int(self.chunk_size),
            "dtype": self.dtype,
            "layers": {
                name: {"shape": list(info["shape"]), "dims": list(info["dims"])}
                for name, info in self.layers.items()
            },
            "has_labels": label_info is not None,
            **({"label_info": dict(label_info)} if label_info is not None else {}),
            **dict(self.attrs),
            "progress": {
                "chunks_written": 0,
                "n_chunks": math.ceil(self.n_samples / self.chunk_size),
            },
        }
        root_attrs = _json(root_attrs)
        # which capture made the store, so that an open store sees when it is replaced:
        # a digest of everything that defines the capture, so a resumed or repeated
        # capture makes the same bytes
        defining = {k: v for k, v in root_attrs.items() if k != "progress"}
        digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()
        root_attrs["peekcore"]["capture_id"] = digest[:32]
        return root_attrs


def _move_in(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the new store ``tmp`` to ``path``, replacing a store there if ``replace``."""
    if is_empty_dir(path):
        path.rmdir()
    if not os.path.lexists(path):
        tmp.rename(path)
        return
    if not replace:
        raise OutputExistsError(
            f"{path} exists: cannot create a store there (another capture created it "
            "meanwhile?); call capture again to resume that store, or pass overwrite=True"
        )
    check_replaceable(path)
    old = path.parent / f".{path.name}.replaced-{uuid.uuid4().hex[:12]}"
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    if old.is_symlink():  # rmtree refuses links: the link itself goes, not what it names
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def check_store_path(path: Path) -> None:
    """Refuse (``OutputPathError``) a store path where no store folder can be made.

    Parameters
    ----------
    path : pathlib.Path
        Where a store is to be created; its parents are created as needed, so
        the nearest one that exists must be a writable folder.
    """
    for parent in path.parents:
        if not os.path.lexists(parent):
            continue
        if not os.path.isdir(parent):
            raise OutputPathError(
                f"cannot create the store {path}: {parent} is a file, not a folder; "
                "choose a store path whose parents are folders (or absent)"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputPathError(
                f"cannot create the store {path}: folder {parent} is not writable; choose "
                "another folder or change its permissions"
            )
        return


def check_replaceable(path: Path) -> None:
    """Refuse (``FileExistsError``) a ``path`` that holds something other than a store.

    Parameters
    ----------
    path : pathlib.Path
        Nothing, an empty folder, or a peekcore store (complete or not) pass.

    Raises
    ------
    OutputExistsError
        When ``path`` holds something that is not a peekcore activation store.
    """
    if not os.path.lexists(path) or is_empty_dir(path):
        return
    meta = path / "zarr.json"
    try:
        tag = json.loads(meta.read_text()).get("attributes", {}).get("peekcore", {})
    except (OSError, ValueError, AttributeError):
        tag = {}
    if not path.is_dir() or not isinstance(tag, dict) or tag.get("kind") != "activation store":
        raise OutputExistsError(
            f"{path} exists and is not a peekcore activation store; overwrite=True only "
            "replaces stores: choose another path or remove it yourself"
        )


def remove_store(path: Path) -> None:
    """Delete a peekcore store folder; refuse anything that is not one.

    Parameters
    ----------
    path : pathlib.Path
        A store, or an empty folder.

    Raises
    ------
    OutputExistsError
        When ``path`` holds something that is not a peekcore activation store.
    """
    check_replaceable(path)
    if is_empty_dir(path):
        path.rmdir()
    elif os.path.lexists(path):
        shutil.rmtree(path)
