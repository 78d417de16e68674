"""Build peekcore's pybind11 extension ``peekcore._core`` through CMake.

``pip install .`` and ``pip install -e .`` both come here; metadata lives in
pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _missing_compiler_message() -> str:
    return (
        "peekcore needs a C++17 compiler to build its native extension, and none was found "
        "(looked for $CXX, c++, g++, clang++). On Debian/Ubuntu: apt-get install g++; "
        "on macOS: xcode-select --install; with conda: conda install cxx-compiler."
    )


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        cxx = os.environ.get("CXX") or next(
            (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
        )
        if cxx is None or shutil.which(cxx.split()[0]) is None:
            raise RuntimeError(_missing_compiler_message())
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("peekcore's build needs CMake >= 3.18: pip install cmake")
        import pybind11
        import scipy_openblas32

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPEEKCORE_BLAS_DIR={Path(scipy_openblas32.__file__).parent}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            "-DPEEKCORE_CPP_LIBRARY=OFF",  # the C++ library is built by CMake alone
            f"-DCMAKE_CXX_COMPILER={shutil.which(cxx.split()[0])}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if os.environ.get("PEEKCORE_CUDA", "") not in ("", "0"):
            args.append("-DPEEKCORE_CUDA=ON")
        args += os.environ.get("PEEKCORE_CMAKE_ARGS", "").split()
        try:
            subprocess.run([cmake, str(ROOT), *args], cwd=build_temp, check=True)
            subprocess.run(
                [cmake, "--build", ".", "--config", cfg, "-j", str(os.cpu_count() or 2)],
                cwd=build_temp,
                check=True,
            )
        except subprocess.CalledProcessError as err:
            raise RuntimeError(
                f"building peekcore._core failed ({err}); the CMake output above says why. "
                "Set PEEKCORE_CMAKE_ARGS to pass extra CMake options."
            ) from err


class BuildPyWithCudaSources(build_py):
    """Ship csrc/cuda and csrc/include as peekcore/_csrc: CuPy compiles them at run time."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads csrc/ in the checkout
            return
        dest = Path(self.build_lib) / "peekcore" / "_csrc"
        for sub in ("cuda", "include"):
            shutil.copytree(ROOT / "csrc" / sub, dest / sub, dirs_exist_ok=True)


setup(
    ext_modules=[CMakeExtension("peekcore._core")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithCudaSources},
)
