"""Every command and snippet of README.md runs as written, on the digits data.

The README's fenced ``bash``/``sh`` and ``python`` blocks run in order in one
temporary folder (Python blocks share one namespace, like a notebook), with the
installed ``peek`` script and this Python first on ``PATH``. A block is left out
only when the HTML comment on the line before it says why:
``<!-- readme-test: skip (reason) -->``, or ``<!-- readme-test: gpu -->`` for a
block that needs a CUDA device (run when there is one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

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
        assert mark is None or mark == "gpu" or re.fullmatch(r"skip \(.{10,}\)", mark), b
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


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path, monkeypatch):
    _digits_layer3(tmp_path / "layer3.npy")
    monkeypatch.chdir(tmp_path)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for b in readme_blocks():
        if b["lang"] not in RUNNABLE or (b["mark"] or "").startswith("skip"):
            continue
        if b["mark"] == "gpu" and not torch.cuda.is_available():
            continue
        where = f"README.md line {b['line']}"
        t0 = time.perf_counter()
        if b["lang"] == "python":
            exec(compile(b["code"], where, "exec"), namespace)  # noqa: S102 - our own README
        else:
            out = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", b["code"]],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert out.returncode == 0, f"{where}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        ran += 1
        print(f"{where}: {time.perf_counter() - t0:.1f} s")  # shown with -rP or on failure
    assert ran >= 5
    # what the commands promised is there
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert (tmp_path / "layer3_r16.npz").exists() and (tmp_path / "m.npz").exists()
