"""The ImageNet-scale end-to-end benchmark, run on the CPU at a small size.

``benchmarks/e2e_imagenet.py`` is the one script that spends GPU time on the
whole user path (capture -> store -> compressed sweep -> refinement ->
report); this runs the same script here so it is known to work before device
time is spent on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_end_to_end_script_runs_small_on_cpu(tmp_path):
    out, js = tmp_path / "e2e", tmp_path / "e2e.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "e2e_imagenet.py"), "--device", "cpu"]
    cmd += ["--n", "96", "--size", "64", "--batch", "32", "--ranks", "1-4", "--iters", "10"]
    cmd += ["--out", str(out), "--json", str(js)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(js.read_text())
    # layer3 of a 64 x 64 image: 1024 channels on a 4 x 4 map, folded
    assert res["layer_shape"] == [96, 1024, 16]
    assert res["store_bytes"] == 96 * 1024 * 16 * 2
    assert res["chosen_rank"] in [1, 2, 3, 4]
    assert 0.0 < res["refined_fit"] <= 1.0
    assert res["capture_vs_forward"] > 0 and res["store_read_gb_s"] > 0
    assert (out / "report.html").stat().st_size > 1000
    assert not (out / "acts.zarr").exists()  # removed unless --keep
    table = run.stdout.strip().splitlines()[-8:]  # the short table comes last
    assert table[0].startswith("case") and table[-1].startswith("report")
    assert any(line.startswith("capture vs forward alone") for line in table)
