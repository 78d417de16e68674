from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import peekcore.kernels  # noqa: E402

CPU_KERNELS = [k for k in peekcore.kernels.names() if k != "cuda"]


@pytest.fixture(autouse=True)
def no_progress_bars(monkeypatch):
    """No progress bars in any test (and the CLI runs it starts) unless a test asks for them."""
    monkeypatch.setenv("PEEKCORE_PROGRESS", "0")


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Random data per test: seeded by the test's name (and PEEKCORE_TEST_SEED, to vary it)."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("PEEKCORE_TEST_SEED", "0"))
    return np.random.default_rng(seed)


@pytest.fixture(params=CPU_KERNELS)
def kernel(request) -> str:
    return request.param


@pytest.fixture
def strict_fp32():
    """cuBLAS in full float32 (TF32 off) for the test: GPU tolerances assume it."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
