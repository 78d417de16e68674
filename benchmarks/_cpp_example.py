"""Build libpeekcore, install it, and build examples/embed against it (for tests and benchmarks)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], **kwargs) -> str:
    """Run a command; on failure raise with the end of its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def cmake_tool(name: str = "cmake") -> str | None:
    """``cmake`` / ``ctest`` from PATH or beside this Python (pip's cmake package)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def build_example(build: Path, prefix: Path, example: Path, jobs: int = 2) -> Path:
    """Configure and build the library in ``build`` (incrementally), install it into
    ``prefix``, build the example in ``example``; returns the example program."""
    import scipy_openblas32

    cmake = cmake_tool()
    if cmake is None:
        raise FileNotFoundError("cmake is not installed: pip install cmake")
    blas = Path(scipy_openblas32.__file__).parent
    run(
        [
            cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DPEEKCORE_PYTHON=OFF", f"-DPEEKCORE_BLAS_DIR={blas}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
    )  # fmt: skip
    run([cmake, "--build", str(build), "-j", str(jobs)])
    run([cmake, "--install", str(build), "--prefix", str(prefix)])
    src = ROOT / "examples" / "embed"
    run([cmake, "-S", str(src), "-B", str(example), f"-DCMAKE_PREFIX_PATH={prefix}"])
    run([cmake, "--build", str(example), "-j", str(jobs)])
    return example / "embed_example"
