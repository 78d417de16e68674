"""Every command and snippet of README.md runs as written, on the digits data.

The README's fenced ``bash``/``sh`` and ``python`` blocks run in order in one
temporary folder (Python blocks share one namespace, like a notebook), with the
installed ``peek`` script and this Python first on ``PATH``. The HTML comment
on the line before a block can say otherwise: ``<!-- readme-test: gpu -->``
for a block that needs a CUDA device (run when there is one);
``<!-- readme-test: source-tree (reason) -->`` for one that runs in the
checkout (the C++ build): it runs on its own in a temporary copy of the
checkout (links to its files), so its ``build/`` goes there;
``<!-- readme-test: skip (reason) -->`` leaves a block out, which only the set-up
commands at the top (what ``make test`` itself runs or installs) may do.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from peekcore.importance import ComponentImportance

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(
    r"(?:^<!-- readme-test: (?P<mark>[^\n]*?) -->\n)?^```(?P<lang>[a-z]*)\n(?P<code>.*?)^```",
    re.M | re.S,
)
RUNNABLE = ("bash", "sh", "python")


def readme_blocks() -> list[dict]:
    """The README's fenced blocks: language, code, marker (``None``, ``"gpu"``, ``"skip ..."``)."""
    out = []
    for m in _BLOCK.finditer(README.read_text(encoding="utf-8")):
        line = README.read_text(encoding="utf-8")[: m.start("code")].count("\n")
        out.append({"lang": m["lang"], "code": m["code"], "mark": m["mark"], "line": line})
    return out


def test_every_left_out_block_says_why():
    blocks = [b for b in readme_blocks() if b["lang"] in RUNNABLE]
    assert len(blocks) >= 8
    for b in blocks:
        mark = b["mark"]
        assert (
            mark is None or mark == "gpu" or re.fullmatch(r"(skip|source-tree) \(.{10,}\)", mark)
        ), b
    # every snippet runs: only the set-up commands (the make targets, pip install) are left out
    skipped = [b for b in blocks if (b["mark"] or "").startswith("skip")]
    assert len(skipped) <= 2 and all(b["lang"] == "bash" for b in skipped), skipped
    assert all("make test" in b["code"] or "pip install" in b["code"] for b in skipped), skipped
    assert len([b for b in blocks if (b["mark"] or "").startswith("source-tree")]) == 1
    # the GPU snippet imports what it uses
    (gpu,) = [b for b in blocks if b["mark"] == "gpu"]
    assert "import torch" in gpu["code"]


def _digits_layer3(path: Path, n: int = 120) -> None:
    """``layer3.npy``: the demo CNN's last convolutional layer over ``n`` digits."""
    import peekcore
    from peekcore.demo import DigitsCNN

    torch.manual_seed(0)
    net = DigitsCNN().eval()
    x = torch.from_numpy(peekcore.datasets.digits().inputs[:n])
    with torch.no_grad():
        acts = net.act3(net.conv3(net.pool(net.act2(net.conv2(net.act1(net.conv1(x)))))))
    np.save(path, acts.numpy())


def _run_shell(block: dict, cwd: Path, timeout: float) -> str:
    """Run a shell block under ``bash -euo pipefail`` in ``cwd``; its stdout.

    This Python's folder comes first on ``PATH`` (as after activating ``.venv``):
    the ``peek`` script, ``torchrun``, ``cmake`` and the Python with
    scipy-openblas32 that the C++ build looks for.
    """
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block["code"]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    where = f"README.md line {block['line']}"
    assert out.returncode == 0, f"{where}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path, monkeypatch):
    _digits_layer3(tmp_path / "layer3.npy")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for b in readme_blocks():
        if b["lang"] not in RUNNABLE or (b["mark"] or "").startswith(("skip", "source-tree")):
            continue
        if b["mark"] == "gpu" and not torch.cuda.is_available():
            continue
        where = f"README.md line {b['line']}"
        t0 = time.perf_counter()
        if b["lang"] == "python":
            exec(compile(b["code"], where, "exec"), namespace)  # noqa: S102 - our own README
        else:
            _run_shell(b, tmp_path, timeout=900)
        ran += 1
        print(f"{where}: {time.perf_counter() - t0:.1f} s")  # shown with -rP or on failure
    assert ran >= 5
    # what the commands promised is there
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert (tmp_path / "layer3_r16.npz").exists() and (tmp_path / "m.npz").exists()
    cli_importance = ComponentImportance.load(tmp_path / "importance.npz")
    assert cli_importance.rank == 8
    # the .npy and labels given apart are the (images, labels) the store captured: fitted rows
    assert cli_importance.metadata["sample_factors"] == "model"
    assert (tmp_path / "importance.html").stat().st_size > 10_000


def _checkout_copy(dest: Path) -> Path:
    """``dest`` holding a link to each top-level file and folder of this checkout but ``build/``.

    A block that runs "in the checkout" writes only new paths (``build/...``), so
    links give it the sources without copying them or writing into the checkout.
    """
    root = README.parent
    dest.mkdir()
    for entry in root.iterdir():
        if entry.name != "build" and not entry.name.startswith("."):
            (dest / entry.name).symlink_to(entry)
    return dest


@pytest.mark.slow
def test_readme_source_tree_blocks_run_as_written(tmp_path):
    """The C++ library's build, install, example and ctest, as the README writes them."""
    blocks = [b for b in readme_blocks() if (b["mark"] or "").startswith("source-tree")]
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    if shutil.which("cmake", path=path) is None:
        pytest.skip("cmake is not installed")
    checkout = _checkout_copy(tmp_path / "checkout")
    for b in blocks:
        t0 = time.perf_counter()
        out = _run_shell(b, checkout, timeout=1800)
        print(f"README.md line {b['line']}: {time.perf_counter() - t0:.1f} s")
    # the installed package, the example's fit of its demo tensor and its passed tests
    assert list((checkout / "build" / "pk").glob("lib*/cmake/peekcore/peekcoreConfig.cmake"))
    assert re.search(r"fit 0\.9[89]", out) and "100% tests passed" in out
