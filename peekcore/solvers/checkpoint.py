"""Checkpoints of a running fit (one model or a whole sweep): atomic, bit-identical resume."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._io import open_npz, read_header, save_npz
from .._version import __version__
from ..distributed import ShardSource
from ..errors import CheckpointError, CheckpointMismatchError, MissingInputError
from ..model import FitHistory
from ..sources import dtype_name, sample_rows
from .passes import iterate_chunks
from .scaling import unscaled

if TYPE_CHECKING:  # pragma: no cover
    from .problem import ModelState, Problem

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_key",
    "data_fingerprint",
    "measure_norm2",
    "check_resumed_norm2",
]

FORMAT = "peekcore.checkpoint"
VERSION = 3  # 3: a data fingerprint, and settings split into exact and rounding-only ones

#: settings that change only the order of floating-point sums: a resume with others
#: continues the same fit, but is not bit-identical to an uninterrupted one (warned)
ROUNDING_ONLY = ("chunk_size", "kernel", "processes")


def _sample_bytes(block: Any) -> bytes:
    if isinstance(block, torch.Tensor):
        block = block.detach().cpu()
        if block.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bits
            block = block.view(torch.int16)
        block = block.numpy()
    return np.ascontiguousarray(block).tobytes()


def data_fingerprint(source: Any) -> dict:
    """What identifies the data cheaply: shape, dtype and a digest of a few samples.

    The samples are ``sources.sample_rows``'s (first, middle and last where the
    source reads any samples, else the first); the rest of the data is checked
    by ``||X||^2``, which the first resumed pass measures again
    (:func:`check_resumed_norm2`). A process's shard is fingerprinted as the
    whole data it belongs to, unscaled.
    """
    whole = unscaled(source)
    if isinstance(whole, ShardSource):
        whole = whole.source
    digest = hashlib.blake2b(digest_size=16)
    for block in sample_rows(whole):
        digest.update(_sample_bytes(block))
    return {
        "shape": [int(d) for d in whole.shape],
        "dtype": dtype_name(whole.dtype),
        "samples": digest.hexdigest(),
    }


def checkpoint_key(problem: Problem, states: list[ModelState], init: str) -> dict:
    """What a checkpoint must agree with to be resumed.

    ``"data"`` and ``"numbers"`` must match exactly (another value changes the
    fit itself); ``"rounding"`` only changes summation order (``ROUNDING_ONLY``).
    """
    settings = problem.settings
    return {
        "data": data_fingerprint(problem.source),
        "numbers": {
            "ranks": [s.rank for s in states],
            "seeds": [s.seed for s in states],
            "method": settings.method,
            "sweeps": settings.sweeps,
            "compute_dtype": str(settings.compute_dtype).removeprefix("torch."),
            "init": init,
            "scale": problem.scale,
        },
        "rounding": {
            "chunk_size": settings.chunk_size,
            "kernel": problem.kernel.name,
            "processes": problem.comm.world,
        },
    }


def _compare(path: Path, recorded: Any, key: dict) -> None:
    """Refuse a checkpoint for other data or settings; warn where only rounding differs."""
    if not isinstance(recorded, dict) or set(recorded) != {"data", "numbers", "rounding"}:
        raise CheckpointError(
            f"{path} was written by an older peekcore without a data fingerprint, so it cannot "
            "be checked against this data; start afresh without resume="
        )
    differ = {}
    for part in ("data", "numbers"):
        for name, value in key[part].items():
            if recorded[part].get(name) != value:
                differ[name] = (recorded[part].get(name), value)
    if differ:
        what = "; ".join(
            f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in differ.items()
        )
        data = " (other data)" if any(k in key["data"] for k in differ) else ""
        raise CheckpointMismatchError(
            f"the checkpoint {path} was written for another fit{data}: {what}. Resume with "
            "the same data and settings, or start afresh without resume=",
            differ,
        )
    changed = {
        k: (recorded["rounding"].get(k), v)
        for k, v in key["rounding"].items()
        if recorded["rounding"].get(k) != v
    }
    if changed:
        what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        warnings.warn(
            f"resuming {path} with {what}: these change only the order of the sums (rounding), "
            "so the fit goes on, but is not bit-identical to an uninterrupted one; resume with "
            "the same values for that",
            RuntimeWarning,
            stacklevel=4,
        )


def measure_norm2(problem: Problem) -> float:
    """``||X||^2`` by one plain pass (for a resumed fit that has no iteration left to run)."""
    total = 0.0
    for _, chunk in iterate_chunks(problem.source, problem.settings.chunk_size):
        x = chunk.to(device=problem.device, dtype=problem.settings.compute_dtype)
        total += float(torch.sum(x * x))
    return problem.comm.allreduce_scalar(total, problem.device)


def check_resumed_norm2(
    path: Path | None, recorded: float, measured: float, dtype: torch.dtype
) -> None:
    """Refuse a resume whose data has another ``||X||^2`` than the checkpoint's data had.

    Measured again by the first resumed pass; it may differ by the rounding of a
    differently ordered sum (another chunk size or process count), not more.
    """
    eps = torch.finfo(dtype).eps
    if not math.isclose(measured, recorded, rel_tol=1e3 * eps, abs_tol=0.0):
        raise CheckpointMismatchError(
            f"the checkpoint {path} was written for other data: ||X||^2 was {recorded:.9g}, "
            f"this data's is {measured:.9g} (the sampled rows matched, others differ). Resume "
            "with the same data, or start afresh without resume=",
            {"norm2": (recorded, measured)},
        )


def save_checkpoint(
    path: Path,
    key: dict,
    states: list[ModelState],
    norm2: float,
    iteration: int,
    full_a: list[torch.Tensor] | None = None,
) -> None:
    """Write the state of every model after a whole iteration, atomically.

    ``full_a`` holds every model's whole sample factor when this process has
    only its rows (a data-parallel fit: rank 0 writes for all).
    """
    arrays = {}
    models = []
    for k, s in enumerate(states):
        a = s.a if full_a is None else full_a[k]
        arrays[f"m{k}_a"] = a.detach().cpu().numpy()
        for i, f in enumerate(s.resident):
            arrays[f"m{k}_resident_{i}"] = f.detach().cpu().numpy()
        models.append({"history": asdict(s.history), "active": s.active})
    header = {
        "format": FORMAT,
        "version": VERSION,
        "key": key,
        "norm2": norm2,
        "iteration": iteration,
        "models": models,
        "peekcore_version": __version__,
    }
    save_npz(path, arrays, header)


def load_checkpoint(
    path: Path, key: dict, states: list[ModelState], device: torch.device, comm: Any = None
) -> tuple[float, int]:
    """Restore every model from a checkpoint (in place); returns ``(||X||^2, iteration)``.

    A data-parallel fit keeps this process's rows of each sample factor, so a
    checkpoint resumes on any number of processes.

    Raises
    ------
    MissingInputError
        No file at ``path`` (a ``FileNotFoundError``).
    CheckpointMismatchError
        Written for other data or settings (its ``differences`` name them).
    CheckpointError
        Not a readable peekcore checkpoint.
    """
    rows = slice(comm.lo, comm.hi) if comm is not None and comm.active else slice(None)
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"no checkpoint at {path}")
    accepted = "a checkpoint written by checkpoint="
    try:
        with open_npz(path, accepted) as data:
            header = read_header(data, path, accepted)
            if header.get("format") != FORMAT:
                what = header.get("format")
                hint = f" (it holds {what!r})" if what is not None else ""
                if what == "peekcore.CPModel":
                    hint = (
                        " but a model saved by CPModel.save (to start from it, pass "
                        "init=peekcore.CPModel.load(path))"
                    )
                raise CheckpointError(
                    f"{path} is not a peekcore checkpoint{hint}; resume= takes a file written "
                    "by checkpoint="
                )
            _compare(path, header.get("key"), key)
            for k, s in enumerate(states):
                s.a = torch.as_tensor(data[f"m{k}_a"][rows], device=device).contiguous()
                s.resident = [
                    torch.as_tensor(data[f"m{k}_resident_{i}"], device=device)
                    for i in range(len(s.resident))
                ]
                s.history = FitHistory(**header["models"][k]["history"])
                s.active = bool(header["models"][k]["active"])
            return float(header["norm2"]), int(header["iteration"])
    except CheckpointError:
        raise
    except (
        KeyError,
        TypeError,
        ValueError,
        OSError,
        json.JSONDecodeError,
        zipfile.BadZipFile,
    ) as err:
        raise CheckpointError(f"{path} is not a readable peekcore checkpoint ({err})") from err
