"""Chunk files written and read directly: encoding, checksums, mappings, O_DIRECT, writeback."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import math
import mmap
import os
import sys
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FileFormatError, InvalidArgumentError
from .format import _chunk_path

READ_MODES = ("auto", "direct", "buffered")
_DIRECT_ALIGN = 4096  # O_DIRECT buffers, offsets and lengths: multiples of the block size
# buffered reads of chunk files this large go through a huge-page mapping (_copy_mapped)
_MAP_READS = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
_MAP_MIN_BYTES = 2 << 20
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux's value
# Python's mmap keeps its own copy of the file descriptor while the mapping lives, so a
# caller that keeps many chunks would run out of descriptors: past this many live
# mapped chunks (or a quarter of the descriptor limit), chunks are read into new arrays
MAX_LIVE_MAPPINGS = 256
_NOT_THE_FILES_FAULT = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)
_live_mappings = [0]  # mapped chunks alive now (a list: changed from finalizers)
_live_lock = threading.Lock()
# start writing each chunk file to disk as soon as it is complete (see _start_writeback)
WRITE_BEHIND = True


def _writes_directly(array: Any) -> bool:
    """Whether chunks of ``array`` may be written as files by :func:`_write_chunk_file`.

    True for the encoding peekcore creates (zarr 3 ``bytes`` little-endian, then
    ``crc32c``, "/"-separated default chunk keys) on a little-endian machine.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec

    meta = array.metadata
    codecs = list(getattr(meta, "codecs", ()))
    encoding = getattr(meta, "chunk_key_encoding", None)
    return (
        sys.byteorder == "little"
        and len(codecs) == 2
        and isinstance(codecs[0], BytesCodec)
        and str(getattr(codecs[0].endian, "value", codecs[0].endian)) == "little"
        and isinstance(codecs[1], Crc32cCodec)
        and getattr(encoding, "name", None) == "default"
        and getattr(encoding, "separator", None) == "/"
    )


def _write_chunk_file(
    array_dir: Path, index: int, data: np.ndarray, dtype: np.dtype, crc: int | None = None
) -> int:
    """Write one whole chunk the way zarr encodes it: raw bytes, then their CRC32C.

    This is byte for byte what zarr's ``bytes`` + ``crc32c`` codecs produce, without
    their copies; like zarr, the file is written beside its place and renamed.
    ``crc``: the CRC32C of the bytes when already known. With ``WRITE_BEHIND`` the
    file's writeback is started before the rename (:func:`_start_writeback`).
    Returns the CRC32C written (the chunk's record, see ``StoreWriter``).
    """
    import google_crc32c

    data = np.ascontiguousarray(data, dtype=dtype)
    if data.ndim == 0:
        raise InvalidArgumentError("a chunk has at least one dimension")
    raw = data.reshape(-1).view(np.uint8)
    path = _chunk_path(array_dir, index, data.ndim)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as fh:
            raw.tofile(fh)  # numpy's own write: no copy, and faster than fh.write here
            if crc is None:
                crc = google_crc32c.value(raw)
            fh.write(np.uint32(crc).astype("<u4").tobytes())
            if WRITE_BEHIND:
                fh.flush()
                _start_writeback(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return int(crc)


def _file_crc(path: Path) -> int:
    """The CRC32C a chunk file ends with (its last 4 bytes, as zarr's ``crc32c`` codec
    writes them); for chunks that zarr wrote, whose bytes peekcore did not see."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return int(np.frombuffer(fh.read(4), "<u4")[0])


def _read_chunk_file(
    array_dir: Path,
    index: int,
    out: np.ndarray,
    verified: dict[int, tuple] | None = None,
    expect: int | None = None,
) -> None:
    """Read one whole chunk written as :func:`_write_chunk_file` writes it into ``out``.

    Checks the file's size and CRC32C, as zarr's codecs would (``ValueError``).
    Files of at least ``_MAP_MIN_BYTES`` are read through a mapping advised
    ``MADV_HUGEPAGE`` where Linux offers it (:func:`_copy_mapped`); others, and
    files that cannot be mapped, with ``readinto`` (:func:`_readinto_full`).
    Both go through the page cache.

    ``verified`` (:func:`_check_unless_verified`): a file whose identity has
    not changed since its CRC32C passed in this process is not checked again:
    its bytes come from the page cache that the check read, and any write to
    the file changes its change time. ``expect``: the CRC32C recorded for this
    chunk when it was written (:func:`_check_chunk_bytes`).
    """
    path = _chunk_path(array_dir, index, out.ndim)
    raw = out.reshape(-1).view(np.uint8)
    with open(path, "rb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        size = st.st_size
        tail: bytes | bytearray | None = None
        if size == raw.size + 4 and size >= _MAP_MIN_BYTES and _MAP_READS:
            tail, got = _copy_mapped(fh.fileno(), raw), size
        if tail is None:
            tail = bytearray(5)  # the CRC, and one byte more to see a longer file
            got = _readinto_full(fh, raw)
            if got == raw.size:
                got += _readinto_full(fh, tail)
    _check_unless_verified(path, raw, got, bytes(tail[:4]), st, index, verified, expect)


def _check_unless_verified(
    path: Path,
    raw: np.ndarray,
    got: int,
    tail: bytes,
    st: os.stat_result,
    index: int,
    verified: dict[int, tuple] | None,
    expect: int | None = None,
) -> bool:
    """:func:`_check_chunk_bytes`, unless ``verified`` says this file passed as it is now.

    ``verified``: chunk index -> :func:`_file_identity` of the file when its
    CRC32C last passed in this process; updated here. Returns whether the check
    was skipped.
    """
    ident = _file_identity(st)
    if verified is not None and got == raw.size + 4 and verified.get(index) == ident:
        return True
    _check_chunk_bytes(path, raw, got, tail, expect)
    if verified is not None:
        verified[index] = ident
    return False


def _readinto_full(fh: Any, buf: Any) -> int:
    """Read file ``fh`` into all of ``buf`` (bytes-like); the bytes read, fewer at its end.

    One ``readinto`` may read less than asked: Linux reads at most 0x7ffff000
    bytes (just under 2 GiB) per call, and other systems and file systems
    have their own limits; so it reads until ``buf`` is full or the file ends.
    """
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _mapping_limit() -> int:
    """Most mapped chunks alive at once: ``MAX_LIVE_MAPPINGS``, at most a quarter of the
    process's descriptor limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_LIVE_MAPPINGS
    if soft == resource.RLIM_INFINITY:
        return MAX_LIVE_MAPPINGS
    return max(0, min(MAX_LIVE_MAPPINGS, soft // 4))


def _mapping_released() -> None:
    with _live_lock:
        _live_mappings[0] -= 1


def _file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or written: device, inode, size, times (ns)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _copy_mapped(fd: int, raw: np.ndarray) -> bytes | None:
    """Copy the first ``raw.size`` bytes of file ``fd`` into ``raw`` through a mapping.

    Returns the 4 bytes after them (the CRC), or None where the file cannot be
    mapped (out of mappings, say), having copied nothing. With ``MADV_HUGEPAGE`` a cold
    file is read ahead in 2 MiB folios from its first byte, where ``read``
    starts every file with small pages and small requests: on the test VM
    32 chunk files of 25 MiB read at 2.6-2.7 GB/s this way against 2.0-2.2
    with ``read`` (``benchmarks/bench_store.py``), and the pages stay cached
    for the next pass. The caller checked the file's size first; a file
    truncated by another process during the copy would end the process
    (``SIGBUS``), but chunk files are only ever replaced by a rename.
    """
    try:
        mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    except OSError:
        return None
    with mapped:
        _advise(mapped, mmap.MADV_HUGEPAGE)
        src = np.frombuffer(mapped, np.uint8, count=raw.size)
        np.copyto(raw, src)
        del src  # the mapping closes only once no array sees it
        return mapped[raw.size : raw.size + 4]


def _map_chunk_file(
    array_dir: Path,
    index: int,
    shape: tuple[int, ...],
    dtype: np.dtype,
    verified: dict[int, tuple],
    expect: int | None = None,
) -> np.ndarray | None:
    """One whole chunk file's data as an array backed by a private mapping of the file, or None.

    None where mappings are not used (``_MAP_READS``), for files under
    ``_MAP_MIN_BYTES`` and for files of the wrong size (the caller's ``read``
    then gives the error). The CRC32C is checked, which also brings every page
    in, unless ``verified`` says this file passed before (see
    :func:`_read_chunk_file`); then the pages are mapped in ahead of use
    (``MADV_POPULATE_READ``) instead. The mapping lives as long as the array:
    no copy and no new memory for a pass over data in the page cache. The
    array is writable; a write copies the page it touches (``MAP_PRIVATE``).
    Until then the bytes are the file's, so the file must not be changed in
    place while the array is used; peekcore only ever replaces chunk files by
    a rename.
    """
    if not _MAP_READS:
        return None
    path = _chunk_path(array_dir, index, len(shape))
    nbytes = math.prod(shape) * dtype.itemsize
    with _live_lock:  # a place among the live mappings, or new arrays (no descriptors held)
        if _live_mappings[0] >= _mapping_limit():
            return None
        _live_mappings[0] += 1
    try:
        with open(path, "rb", buffering=0) as fh:
            st = os.fstat(fh.fileno())
            if st.st_size != nbytes + 4 or st.st_size < _MAP_MIN_BYTES:
                mapped = None
            else:
                try:  # private: writes to the array copy the page they touch, not the file
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                except OSError:  # out of mappings or commit charge (strict overcommit)
                    mapped = None
    except BaseException:
        _mapping_released()
        raise
    if mapped is None:
        _mapping_released()
        return None  # the caller reads the file
    weakref.finalize(mapped, _mapping_released)
    _advise(mapped, mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(mapped, np.uint8, count=nbytes)
    tail = mapped[nbytes : nbytes + 4]
    if _check_unless_verified(path, raw, st.st_size, tail, st, index, verified, expect):
        _advise(mapped, _MADV_POPULATE_READ)  # no CRC read them: map the pages in ahead of use
    return raw.view(dtype).reshape(shape)


def _advise(mapped: mmap.mmap, advice: int) -> None:
    """``madvise`` as advice only: a kernel without it (no THP, Linux < 5.14) still reads."""
    with contextlib.suppress(OSError):
        mapped.madvise(advice)


def _available_memory() -> int | None:
    """Bytes of memory available for new data now (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_uncached(mode: str, nbytes: int) -> bool:
    """Whether a layer of ``nbytes`` is read with ``O_DIRECT`` (see ``ActivationStore``)."""
    if mode != "auto":
        return mode == "direct" and hasattr(os, "O_DIRECT")
    avail = _available_memory()
    return hasattr(os, "O_DIRECT") and avail is not None and nbytes > avail // 2


def _aligned_blocks(nbytes: int) -> np.ndarray:
    """``uint8`` buffer for an ``O_DIRECT`` read of a file of ``nbytes``.

    Its address is block-aligned and its size is ``nbytes + 1`` rounded up to
    whole blocks: a direct read asks for whole blocks, and the extra byte
    shows a file longer than expected.
    """
    size = -(-(nbytes + 1) // _DIRECT_ALIGN) * _DIRECT_ALIGN
    base = np.empty(size + _DIRECT_ALIGN, np.uint8)
    off = -base.ctypes.data % _DIRECT_ALIGN
    return base[off : off + size]


def _read_chunk_file_direct(
    array_dir: Path, index: int, buf: np.ndarray, nbytes: int, ndim: int, expect: int | None = None
) -> bool:
    """Read one whole chunk file of ``nbytes`` data bytes into ``buf`` with ``O_DIRECT``.

    ``buf`` comes from :func:`_aligned_blocks` (``nbytes + 4``); the file's size
    and CRC32C are checked as in :func:`_read_chunk_file` (``ValueError``).
    Returns False, having read nothing, where the file system refuses
    ``O_DIRECT``.
    """
    path = _chunk_path(array_dir, index, ndim)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return False
        raise
    got = 0
    try:
        while got < buf.size:
            n = os.readv(fd, [memoryview(buf[got:])])
            got += n
            if n == 0 or n % _DIRECT_ALIGN:  # end of file
                break
    except OSError as err:
        if err.errno == errno.EINVAL and got == 0:  # alignment refused by this file system
            return False
        raise
    finally:
        os.close(fd)
    _check_chunk_bytes(path, buf[:nbytes], got, buf[nbytes : nbytes + 4].tobytes(), expect)
    return True


def _check_chunk_bytes(
    path: Path, raw: np.ndarray, got: int, tail: bytes, expect: int | None = None
) -> None:
    """Refuse a chunk file of the wrong size, whose CRC32C does not match its bytes, or
    (``expect``, the CRC32C recorded for this chunk when it was written) whose bytes are
    whole but are another chunk's: a file moved or swapped (``ValueError``)."""
    import google_crc32c

    if got != raw.size + 4:
        raise FileFormatError(f"chunk file {path} does not hold {raw.size + 4} bytes")
    crc = int(np.frombuffer(tail, "<u4")[0])
    if crc != google_crc32c.value(raw):
        raise FileFormatError(f"chunk file {path} fails its CRC32C checksum")
    if expect is not None and crc != expect:
        raise FileFormatError(
            f"chunk file {path} is intact but is not the chunk written there: its CRC32C "
            f"{crc:08x} is not the {expect:08x} the store recorded for this chunk (a chunk "
            "file moved, swapped or copied in from elsewhere)"
        )


@functools.cache
def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux, 64-bit offsets), or None."""
    if not sys.platform.startswith("linux") or sys.maxsize < 2**32:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # pragma: no cover - not glibc or musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> bool:
    """Start writing a file's dirty pages to disk, without waiting for it (write-behind).

    A capture writes far more than it will read back soon: starting each chunk
    file's writeback once it is complete keeps the disk busy while the model
    runs, instead of leaving it all in the page cache to be flushed in one go
    later (or to throttle the writer once the kernel's dirty limit is hit). The
    pages stay cached. Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, as
    RocksDB's ``bytes_per_sync`` and PostgreSQL's ``*_flush_after`` do; it says
    nothing about durability (no metadata, no cache flush). Returns whether it
    was started (False on other systems, or where the file system refuses).
    """
    fn = _sync_file_range()
    return fn is not None and fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0
