"""Host-to-device streaming of chunks: pinned double buffers, copies on their own stream.

While the GPU works on chunk ``k``, chunk ``k + 1`` is copied on a separate
CUDA stream (and, for pageable sources such as numpy arrays or memmaps,
first gathered into a pinned host buffer by the host). Two device buffers
alternate; a buffer is refilled only after the compute that read it has
finished (CUDA events, no host waits on the compute stream).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["stage_to_device"]


class _Slot:
    def __init__(self) -> None:
        self.device_buf: torch.Tensor | None = None
        self.host_buf: torch.Tensor | None = None
        self.copied: torch.cuda.Event | None = None  # host buffer free again after this
        self.consumed: torch.cuda.Event | None = None  # device buffer free again after this


def _buffer(buf: torch.Tensor | None, x: torch.Tensor, **kw) -> torch.Tensor:
    need = x.numel()
    if buf is None or buf.numel() < need or buf.dtype != x.dtype:
        buf = torch.empty(need, dtype=x.dtype, **kw)
    return buf


def stage_to_device(
    chunks: Iterator[tuple[int, torch.Tensor]], device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(offset, chunk)`` with every chunk on ``device``, copies overlapped with compute.

    Chunks already on the device pass through untouched. A yielded device
    chunk is valid until the consumer asks for the chunk after next.
    """
    compute = torch.cuda.current_stream(device)
    copier = torch.cuda.Stream(device)
    slots = [_Slot(), _Slot()]
    k = 0
    for offset, x in chunks:
        if x.device == device:
            yield offset, x
            continue
        slot = slots[k % 2]
        k += 1
        x = x.contiguous()
        if x.is_pinned():
            host = x
        else:
            if slot.copied is not None:
                slot.copied.synchronize()  # the previous copy out of this host buffer is done
            slot.host_buf = _buffer(slot.host_buf, x, pin_memory=True)
            host = slot.host_buf[: x.numel()].view(x.shape)
            host.copy_(x)
        slot.device_buf = _buffer(slot.device_buf, x, device=device)
        dev = slot.device_buf[: x.numel()].view(x.shape)
        with torch.cuda.stream(copier):
            if slot.consumed is not None:
                copier.wait_event(slot.consumed)
            dev.copy_(host, non_blocking=True)
            slot.copied = torch.cuda.Event()
            slot.copied.record(copier)
        compute.wait_event(slot.copied)
        dev.record_stream(compute)
        yield offset, dev
        slot.consumed = torch.cuda.Event()
        slot.consumed.record(compute)
