"""Store chunks filled batch by batch and written by a background thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np
import torch

from ..errors import CaptureError, PeekcoreError
from ..store import StoreWriter, storage_dtype, to_storage


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
                raise CaptureError("the data yielded more samples than it declares")
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
        if isinstance(self._error, PeekcoreError):  # says what failed and what to do
            raise self._error
        if self._error is not None:
            raise CaptureError(f"writing the store failed: {self._error}") from self._error

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
