"""The stacked iteration: views into the stack, snapshots, release, graph eligibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch

from peekcore.solvers.graphs import agree, graphs_allowed
from peekcore.solvers.iteration import Stack, step
from peekcore.solvers.problem import new_state, prepare


def _setup(rng, ranks, method="als", shape=(31, 6, 5), kernel=None):
    x, _ = ref.low_rank(rng, shape, 3, noise=0.1)
    x = np.abs(x) if method == "hals" else x
    problem = prepare(
        x,
        method=method,
        n_iter_max=10,
        tol=0.0,
        chunk_size=12,
        max_chunk_bytes=None,
        dtype=None,
        device="cpu",
        kernel=kernel() if callable(kernel) else kernel,
        sweeps=2,
        checkpoint=None,
        checkpoint_every=1,
    )
    init = problem.initializer("random")
    states = [
        new_state(init, r, seed, problem.settings.compute_dtype) for seed, r in enumerate(ranks)
    ]
    return x, problem, states


def test_states_see_the_stack_through_views(rng):
    _, problem, states = _setup(rng, [2, 3])
    before = [[f.clone() for f in s.resident] for s in states]
    stack = Stack.of(states)
    assert stack.columns() == [(0, 2), (2, 5)]
    assert stack.holds(states) and not stack.holds(states[::-1]) and not stack.holds(states[:1])
    for s, old in zip(states, before, strict=True):
        for f, g in zip(s.resident, old, strict=True):
            torch.testing.assert_close(f, g)
    stack.resident[0][:, 3] = 7.0  # the second model's second column
    assert torch.all(states[1].resident[0][:, 1] == 7.0)
    assert not torch.any(states[0].resident[0] == 7.0)


def test_step_then_restore_gives_the_same_step_again(rng):
    _, problem, states = _setup(rng, [1, 3])
    stack = Stack.of(states)
    first = step(problem, stack, None)  # measures ||X||^2
    saved = stack.snapshot()
    again = step(problem, stack, first.norm2)
    moved = stack.snapshot()
    assert not all(torch.equal(a, b) for a, b in zip(saved, moved, strict=True))
    stack.restore(saved)
    for a, b in zip(stack.snapshot(), saved, strict=True):
        assert torch.equal(a, b)
    third = step(problem, stack, first.norm2)
    assert torch.equal(third.values, again.values)
    for a, b in zip(stack.snapshot(), moved, strict=True):
        assert torch.equal(a, b)


def test_step_residuals_equal_the_dense_residual(rng):
    """values[2k] is ||X - M_k||^2 of the factors after the step, checked densely."""
    x, problem, states = _setup(rng, [2, 4])
    stack = Stack.of(states)
    norm2 = float(np.sum(x**2))
    result = step(problem, stack, norm2)
    for k, s in enumerate(states):
        factors = [s.a.double().numpy(), *(f.numpy() for f in s.resident)]
        want = float(np.sum((x - ref.full(factors)) ** 2))
        assert result.values[2 * k].item() == pytest.approx(want, rel=1e-9, abs=1e-9 * norm2)
        assert result.values[2 * k + 1].item() == 0.0


def test_a_model_that_leaves_owns_its_columns(rng):
    _, problem, states = _setup(rng, [2, 3, 1])
    stack = Stack.of(states)
    Stack.release(states[1])
    for f in (states[1].a, *states[1].resident):
        assert f.is_contiguous()
        assert f.untyped_storage().data_ptr() != stack.a.untyped_storage().data_ptr()
        assert all(
            f.untyped_storage().data_ptr() != g.untyped_storage().data_ptr() for g in stack.resident
        )
    kept = [f.clone() for f in states[1].resident]
    step(problem, stack, 1.0)  # the stack moves on; the released model does not
    for f, g in zip(states[1].resident, kept, strict=True):
        assert torch.equal(f, g)


def test_agree_asks_for_agreement_at_the_given_scale():
    w = torch.tensor([1.0, -2.0, 4.0])
    assert agree([w.clone()], [w], [None])
    assert agree([w + 1e-6], [w], [None])
    assert not agree([w + 1e-2], [w], [None])
    assert agree([w + 1e-2], [w], [1e3])  # residuals are judged against ||X||^2
    assert not agree([w * math.nan], [w], [None])
    assert agree([torch.empty(0)], [torch.empty(0)], [None])


def test_graphs_are_for_gpu_resident_data_only(rng, monkeypatch):
    _, problem, _ = _setup(rng, [2])
    assert not graphs_allowed(problem)  # a CPU fit
    monkeypatch.setenv("PEEKCORE_CUDA_GRAPHS", "0")
    assert not graphs_allowed(problem)


# ------------------------------------------- capture_step's control flow, without a GPU


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: capture runs the step eagerly, replay
    applies ``bad`` (a stand-in for a graph that reads stale buffers)."""

    bad = None
    stack = None

    def replay(self):
        if _FakeGraph.bad is not None:
            _FakeGraph.bad(_FakeGraph.stack)


class _FakeStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    import contextlib

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "current_stream", lambda *a, **k: _FakeStream())
    monkeypatch.setattr(cuda, "Stream", lambda *a, **k: _FakeStream())
    monkeypatch.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(cuda, "graph", lambda g, **k: contextlib.nullcontext())
    _FakeGraph.bad = None
    yield _FakeGraph
    _FakeGraph.bad = _FakeGraph.stack = None


def _gpu_pass_as_torch():
    from peekcore.kernels.cuda import CudaKernel

    return CudaKernel("cpu", backend="torch")


KERNELS = [None, _gpu_pass_as_torch]


def _reference_step(rng_seed, kernel, method):
    """The eager outcome of the second iteration, from a fresh identical setup."""
    rng = np.random.default_rng(rng_seed)
    _, problem, states = _setup(rng, [2, 3], method=method, kernel=kernel)
    stack = Stack.of(states)
    norm2 = step(problem, stack, None).norm2
    result = step(problem, stack, norm2)
    return result.values.clone(), stack.snapshot()


@pytest.mark.parametrize("failure", [None, "capture", "disagreement"])
@pytest.mark.parametrize("kernel", KERNELS, ids=["native", "gpu-pass-as-torch"])
@pytest.mark.parametrize("method", ["als", "hals"])
def test_capture_step_leaves_the_eager_outcome(fake_cuda, monkeypatch, failure, kernel, method):
    from peekcore.solvers import graphs

    want_values, want_state = _reference_step(5, kernel, method)
    rng = np.random.default_rng(5)
    _, problem, states = _setup(rng, [2, 3], method=method, kernel=kernel)
    stack = Stack.of(states)
    norm2 = step(problem, stack, None).norm2
    fake_cuda.stack = stack
    if failure == "capture":

        def broken(g, **k):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(torch.cuda, "graph", broken)
    elif failure == "disagreement":
        fake_cuda.bad = lambda s: s.resident[0].add_(1.0)
    if failure is None:
        graphed, result = graphs.capture_step(problem, stack, norm2)
        assert graphed is not None
    else:
        with pytest.warns(RuntimeWarning, match="CUDA-graph replay"):
            graphed, result = graphs.capture_step(problem, stack, norm2)
        assert graphed is None
    torch.testing.assert_close(result.values, want_values, rtol=1e-12, atol=0)
    for got, want in zip(stack.snapshot(), want_state, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # the states see the outcome through their views
    torch.testing.assert_close(states[1].resident[0], want_state[1][:, 2:5], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dims", [(6, 5), (4, 3, 5), (3, 4, 2, 3)], ids=["3way", "4way", "5way"])
def test_resident_mttkrps_in_update_order_equal_the_einsum(rng, dims):
    """Modes 0..d-2 from one Y = T x_d F_d, the last from T: each equals the plain
    einsum MTTKRP with the factors as ALS has updated them by then."""
    from peekcore.solvers.resident import ResidentMTTKRP, resident_mttkrp

    rank = 3
    t = torch.from_numpy(rng.standard_normal((rank, *dims)))
    factors = [torch.from_numpy(rng.standard_normal((n, rank))) for n in dims]
    mttkrp = ResidentMTTKRP(t)
    for m in range(len(dims)):
        want = resident_mttkrp(t, factors, m)
        got = mttkrp(m, factors)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        factors[m].copy_(torch.from_numpy(rng.standard_normal((dims[m], rank))))  # ALS's update


def test_on_device_reads_a_sources_device():
    from peekcore.solvers.passes import on_device
    from peekcore.sources import ArraySource

    host = ArraySource(np.zeros((3, 2, 2), np.float32))
    assert on_device(host, torch.device("cpu"))
    assert not on_device(host, torch.device("cuda", 0))

    class Declares:  # a custom source that says where its chunks are
        device = "cuda"

    assert not on_device(Declares(), torch.device("cpu"))


def test_stacked_solves_treat_each_model_on_its_own_scale(rng):
    """A stack of models is one block-diagonal Gram; a singular block (a dead column)
    next to one 1e17 times larger must not change the others' solves."""
    from peekcore.solvers.resident import _device_cholesky, als_solve, gram_inverse

    sizes, scales = [1, 3, 2], [0.186, 3.5e17, 1.0]
    blocks = []
    for n, scale in zip(sizes, scales, strict=True):
        f = rng.standard_normal((n + 4, n))
        blocks.append(torch.from_numpy(scale * (f.T @ f)))
    blocks[1][2, :] = 0.0  # a dead column in the large model
    blocks[1][:, 2] = 0.0
    g = torch.block_diag(*blocks)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    m = torch.from_numpy(rng.standard_normal((5, sum(sizes))))
    stacked_solve = als_solve(m, g, seg, 3)
    stacked_inverse = gram_inverse(g, seg, 3)
    chol = _device_cholesky(g, seg, 3)  # the GPU path's ridge, run on the CPU
    device_solve = torch.cholesky_solve(m.T, chol).T
    lo = 0
    for n, block in zip(sizes, blocks, strict=True):
        cols = slice(lo, lo + n)
        alone = m[:, cols] @ torch.linalg.pinv(block, hermitian=True)
        torch.testing.assert_close(stacked_solve[:, cols], alone, rtol=1e-9, atol=0)
        torch.testing.assert_close(
            stacked_inverse[cols, cols], torch.linalg.pinv(block, hermitian=True), rtol=1e-9, atol=0
        )
        if n != 3:  # the GPU path's ridge regularizes the dead column instead of cutting it
            torch.testing.assert_close(device_solve[:, cols], alone, rtol=1e-6, atol=0)
        lo += n
