"""CUDA-graph replay of the fit loop's iterations.

An iteration of a fit on data held on the GPU launches the same kernels on
the same buffers every time (the chunks are views of one tensor and
:func:`peekcore.solvers.iteration.step` works in place), so after the first
pass it is captured once as a CUDA graph and replayed: the host then spends
microseconds per iteration instead of one Python call per launch, which is
what a small fit's iteration time is made of on a fast card.

Capture is checked, never trusted: the first captured iteration is also run
eagerly from the same state (torch asks for an eager warm-up before capture
anyway), and the graph is kept only when its replay gives the same factors
and residuals. Any failure, to capture or to agree, keeps the eager result
and turns graphs off for the rest of the fit with a warning.
``PEEKCORE_CUDA_GRAPHS=0`` turns them off altogether.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..sources import ArraySource
from .iteration import Stack, StepResult, step
from .passes import on_device

__all__ = ["GraphedStep", "agree", "capture_step", "graphs_allowed"]

#: agreement asked of a replay, relative to each factor's largest entry and to
#: ||X||^2 for the residuals: float32 accumulation in another order (cuBLAS may
#: pick another reduction under capture) differs near 1e-7; a replay that reads
#: a stale buffer differs at order 1
AGREEMENT = 1e-4
#: iterations a fit must have left for a capture to pay for its extra iteration
MIN_ITERATIONS_LEFT = 3


def graphs_allowed(problem) -> bool:
    """Whether ``problem``'s iterations may be replayed as CUDA graphs.

    They may when the kernel runs on a GPU, the data is a tensor already on
    that GPU (chunks are views, the same addresses every pass), the fit runs
    in one process, and ``PEEKCORE_CUDA_GRAPHS`` is not ``0``.
    """
    if os.environ.get("PEEKCORE_CUDA_GRAPHS", "1") == "0":
        return False
    if problem.device.type != "cuda" or problem.comm.active:
        return False
    source = problem.source
    return (
        isinstance(source, ArraySource)
        and isinstance(source.array, torch.Tensor)
        and on_device(source, problem.kernel.device)
    )


class GraphedStep:
    """One captured iteration of a fixed stack; calling it replays the graph."""

    def __init__(self, graph: torch.cuda.CUDAGraph, result: StepResult) -> None:
        self.graph = graph
        self.result = result  # tensors in the graph's memory, refilled by each replay

    def __call__(self) -> StepResult:
        self.graph.replay()
        return self.result


def agree(got: list[torch.Tensor], want: list[torch.Tensor], scales: list[float | None]) -> bool:
    """Whether each ``got`` equals its ``want`` to ``AGREEMENT`` of its scale.

    A scale of None means the largest magnitude of ``want``. NaN never agrees.
    """
    for g, w, scale in zip(got, want, scales, strict=True):
        if not w.numel():
            continue
        w64 = w.to(torch.float64)
        if scale is None:
            scale = float(torch.max(torch.abs(w64)))
        err = float(torch.max(torch.abs(g.to(torch.float64) - w64)))
        if not err <= AGREEMENT * max(scale, 1e-300):
            return False
    return True


def capture_step(problem, stack: Stack, norm2: float) -> tuple[GraphedStep | None, StepResult]:
    """Run one iteration of ``stack`` and capture it as a CUDA graph.

    The iteration runs eagerly on a side stream (the warm-up capture needs,
    and the reference), the stack is put back, the iteration is captured and
    replayed, and the two outcomes are compared.

    Returns
    -------
    (GraphedStep or None, StepResult)
        The graph (None when capture failed or disagreed, after a warning) and
        this iteration's result; either way the stack holds the iteration's
        outcome.
    """
    device = problem.device
    saved = stack.snapshot()
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        eager = step(problem, stack, norm2)
        outcome = stack.snapshot()
        values = eager.values.clone()
    main.wait_stream(side)

    def fall_back(reason: str) -> tuple[None, StepResult]:
        warnings.warn(
            f"peekcore: CUDA-graph replay of the fit's iterations is off for this fit ({reason}); "
            "it runs eagerly, with the same results. Set PEEKCORE_CUDA_GRAPHS=0 to skip the "
            "attempt.",
            RuntimeWarning,
            stacklevel=4,
        )
        torch.cuda.synchronize(device)
        stack.restore(outcome)
        return None, StepResult(values, eager.t, eager.ata)

    stack.restore(saved)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            result = step(problem, stack, norm2)
        graph.replay()
    except Exception as err:  # noqa: BLE001 - any capture failure: stay eager
        return fall_back(f"capture failed: {type(err).__name__}: {err}")
    got = [result.values, stack.a, *stack.resident]  # compared, not kept: no copies
    if not agree(got, [values, *outcome], [norm2] + [None] * len(outcome)):
        return fall_back("the replayed iteration disagreed with the eager one")
    return GraphedStep(graph, result), result
