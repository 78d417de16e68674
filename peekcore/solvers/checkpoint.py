"""Checkpoints of a running fit (one model or a whole sweep): atomic, bit-identical resume."""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._io import open_npz, read_header, save_npz
from .._version import __version__
from ..model import FitHistory

if TYPE_CHECKING:  # pragma: no cover
    from .engine import ModelState, RunSettings

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_key"]

FORMAT = "peekcore.checkpoint"
VERSION = 2


def checkpoint_key(shape: tuple[int, ...], settings: RunSettings, states: list[ModelState]) -> dict:
    """What a checkpoint must agree with to be resumed: data shape, models, solver settings."""
    return {
        "shape": list(shape),
        "ranks": [s.rank for s in states],
        "seeds": [s.seed for s in states],
        "method": settings.method,
        "sweeps": settings.sweeps,
        "compute_dtype": str(settings.compute_dtype).removeprefix("torch."),
    }


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
    checkpoint resumes on any number of processes. Refuses a checkpoint written
    for other data, models or settings.
    """
    rows = slice(comm.lo, comm.hi) if comm is not None and comm.active else slice(None)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
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
                raise ValueError(
                    f"{path} is not a peekcore checkpoint{hint}; resume= takes a file written "
                    "by checkpoint="
                )
            if header.get("key") != key:
                raise ValueError(
                    f"the checkpoint {path} was written for {header.get('key')}, but this fit "
                    f"is {key}; resume with the same data and settings, or start afresh "
                    "without resume="
                )
            for k, s in enumerate(states):
                s.a = torch.as_tensor(data[f"m{k}_a"][rows], device=device).contiguous()
                s.resident = [
                    torch.as_tensor(data[f"m{k}_resident_{i}"], device=device)
                    for i in range(len(s.resident))
                ]
                s.history = FitHistory(**header["models"][k]["history"])
                s.active = bool(header["models"][k]["active"])
    except (KeyError, OSError, json.JSONDecodeError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable peekcore checkpoint ({err})") from err
    except ValueError as err:
        if any(w in str(err) for w in ("written for", "not a peekcore", "peekcore header")):
            raise
        raise ValueError(f"{path} is not a readable peekcore checkpoint ({err})") from err
    return float(header["norm2"]), int(header["iteration"])
