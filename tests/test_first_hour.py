"""A new user's first hour (issue 15): the command line as a person runs it.

Each test runs the installed ``peek`` script in a subprocess from a temporary
folder, as a user would, and checks one thing that used to break or confuse.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from peekcli import run_peek, run_peek_json

from peekcore import datasets
from peekcore.report import figures

pytestmark = pytest.mark.slow  # each test starts the script (a few seconds of imports)


@pytest.fixture
def npy(tmp_path):
    rng = np.random.default_rng(15)
    np.save(tmp_path / "x.npy", np.abs(rng.standard_normal((30, 5, 4))).astype(np.float32))
    return tmp_path / "x.npy"


def test_grey_images_get_a_channel_axis(tmp_path):
    """An N x H x W array reached the model unchanged (expected input ... to have 1 channels)."""
    grey = datasets.digits().inputs[:40, 0]  # 40 x 8 x 8
    np.save(tmp_path / "grey.npy", grey)
    code, res, err = run_peek_json(
        "capture",
        "--model",
        "peekcore.demo:DigitsCNN",
        "--data",
        "grey.npy",
        "--layers",
        "act1",
        "--store",
        "acts.zarr",
        cwd=tmp_path,
    )
    assert code == 0, err
    assert res["layers"]["act1"][0] == 40
    assert any("read as 40 x 1 x 8 x 8" in note for note in res["notes"])


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_before_or_after_the_subcommand(tmp_path, npy, where):
    """`peek info sweep.npz --json` gave `unrecognized arguments: --json`."""
    argv = ["fit", "x.npy", "--rank", "2", "--iters", "3", "--out", "m.npz"]
    argv = ["--json", *argv] if where == "before" else [*argv, "--json"]
    out = run_peek(*argv, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rank"] == 2
    out = run_peek("info", "m.npz", "--json", cwd=tmp_path)
    assert json.loads(out.stdout)["kind"] == "CP model"


def test_json_errors_are_one_json_document(tmp_path, npy):
    for argv, kind, code in (
        (["fit", "missing.npy", "--rank", "2"], "MissingInputError", 1),
        (["fit", "x.npy", "--rank", "0"], "InvalidArgumentError", 1),
        (["info", "x.npy", "--no-such-option"], "UsageError", 2),
        (["sweep", "x.npy", "--ranks", "3-1"], None, 1),
    ):
        out = run_peek(*argv, "--json", cwd=tmp_path)
        doc = json.loads(out.stdout)  # the whole of stdout is one document
        assert out.returncode == code
        assert set(doc) == {"error", "kind"} and doc["error"]
        assert kind is None or doc["kind"] == kind


def test_only_rank_0_prints_under_torchrun(tmp_path, npy):
    """torchrun sets RANK: the other processes print nothing on stdout."""
    argv = ["--json", "fit", "x.npy", "--rank", "2", "--iters", "2"]
    assert run_peek(*argv, cwd=tmp_path, env={"RANK": "1"}).stdout == ""
    assert json.loads(run_peek(*argv, cwd=tmp_path, env={"RANK": "0"}).stdout)["rank"] == 2


def test_missing_extras_name_the_pip_line(tmp_path, monkeypatch):
    (tmp_path / "cls").mkdir()
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision fails
    with pytest.raises(ImportError, match=r'pip install "peekcore\[vision\]"'):
        datasets.image_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "peekcore\[report\]"'):
        figures._mpl()


def test_human_output_is_an_aligned_table_without_nan(tmp_path, npy):
    """`peek sweep` and `peek info sweep.npz` printed one long JSON line with NaN in it."""
    argv = ["sweep", "x.npy", "--ranks", "1-3", "--replicates", "1", "--iters", "5"]
    for out in (
        run_peek(*argv, "--out", "s.npz", cwd=tmp_path),
        run_peek("info", "s.npz", cwd=tmp_path),
    ):
        assert out.returncode == 0, out.stderr
        text = out.stdout
        lines = text.splitlines()
        assert "{" not in text and not any("NaN" in line for line in lines if line[:1] != "-")
        header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "fit"])
        rows = lines[header + 2 : header + 5]
        assert [row.split()[0] for row in rows] == ["1", "2", "3"]
        # right-aligned numbers: every row as long as the rule under the header
        assert {len(row) for row in rows} == {len(lines[header + 1].rstrip())}
        # stability with one replicate is undefined: '-' and the footnote saying so
        assert all(row.split()[6] == "-" for row in rows) and "nan" not in "".join(rows)
        assert any(line.startswith("- : not defined here (NaN)") for line in lines)
        assert max(len(line) for line in lines) < 200


def test_results_record_their_source(tmp_path, npy):
    """Sweep and model files forgot which layer they came from."""
    import peekcore

    model = peekcore.cp_als(str(npy), 2, n_iter_max=3)
    assert model.metadata["source"] == {"file": str(npy.resolve())}
    images = np.random.default_rng(1).random((24, 1, 6, 6), dtype=np.float32)
    from peekcore.demo import DigitsCNN

    net = DigitsCNN()
    store = peekcore.capture(net, images, ["act1"], tmp_path / "acts.zarr", dtype="float32")
    layer = store["act1"]
    sweep = peekcore.rank_sweep(layer, [1, 2], 1, n_iter_max=3)
    want = {
        "store": str((tmp_path / "acts.zarr").resolve()),
        "layer": "act1",
        "layout": list(layer.dims),
    }
    assert sweep.metadata["source"] == want and sweep.model().metadata["source"] == want
    sweep.save(tmp_path / "s.npz")
    assert peekcore.RankSweep.load(tmp_path / "s.npz").metadata["source"] == want
    code, info, _ = run_peek_json("info", "s.npz", cwd=tmp_path)
    assert code == 0 and info["source"] == want


def test_messages_use_the_flags_a_user_types(tmp_path):
    """CLI errors said `overwrite=True` and `resume=`, the Python names."""
    np.save(tmp_path / "images.npy", datasets.digits().inputs[:20])
    argv = ["capture", "--model", "peekcore.demo:DigitsCNN", "--data", "images.npy"]
    argv += ["--layers", "act1", "--store", "acts.zarr"]
    code, _, err = run_peek_json(*argv, "--dtype", "float32", cwd=tmp_path)
    assert code == 0, err
    code, res, _ = run_peek_json(*argv, "--dtype", "float16", cwd=tmp_path)
    assert code == 1 and "other settings" in res["error"]
    assert "--overwrite to replace it" in res["error"] and "overwrite=True" not in res["error"]
    np.save(tmp_path / "x.npy", np.ones((8, 3, 2), np.float32))
    fit = ["fit", "x.npy", "--rank", "2", "--iters", "2"]
    assert run_peek_json(*fit, "--out", "m.npz", cwd=tmp_path)[0] == 0
    code, res, _ = run_peek_json(*fit, "--resume", "m.npz", cwd=tmp_path)  # a model file
    assert code == 1 and "--resume" in res["error"] and "resume=" not in res["error"]


def test_cuda_without_cuda_is_a_clear_error(tmp_path, npy):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, res, err = run_peek_json("fit", "x.npy", "--rank", "2", "--device", "cuda", cwd=tmp_path)
    assert code == 1 and res["kind"] == "InvalidArgumentError"
    assert "device 'cuda'" in res["error"] and "use device 'cpu'" in res["error"]
    assert "Torch not compiled" not in err


def test_unconverged_fits_say_so(tmp_path, npy):
    out = run_peek("fit", "x.npy", "--rank", "3", "--iters", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "not converged: the fit stopped at --iters 2" in out.stdout
    code, res, _ = run_peek_json("sweep", "x.npy", "--ranks", "1-2", "--iters", "2", cwd=tmp_path)
    assert code == 0 and res["notes"][0].startswith("not converged: 6 of 6 fits")
    code, res, _ = run_peek_json("fit", "x.npy", "--rank", "1", "--iters", "500", cwd=tmp_path)
    assert code == 0 and res["converged"] and res["notes"] == []


def test_progress_bars_only_on_a_terminal_or_when_asked(tmp_path, npy, monkeypatch):
    """Bars written into log files filled them with carriage-return lines."""
    monkeypatch.delenv("PEEKCORE_PROGRESS")  # the suite's default (conftest) off: a user's shell
    argv = ["fit", "x.npy", "--rank", "2", "--iters", "3", "--tol", "0"]
    quiet = run_peek(*argv, cwd=tmp_path)  # stderr is a pipe, as in a log file
    assert quiet.returncode == 0 and "\r" not in quiet.stderr and "it/s" not in quiet.stderr
    asked = run_peek(*argv, "--progress", cwd=tmp_path)
    assert asked.returncode == 0 and "it/s" in asked.stderr
    by_env = run_peek(*argv, cwd=tmp_path, env={"PEEKCORE_PROGRESS": "1"})
    assert by_env.returncode == 0 and "it/s" in by_env.stderr
    bad = run_peek(*argv, cwd=tmp_path, env={"PEEKCORE_PROGRESS": "yes"})
    assert bad.returncode != 0 and "PEEKCORE_PROGRESS=0" in bad.stderr


def test_makefile_set_up_says_what_it_does(tmp_path):
    """`make demo` spent minutes in silent set-up; `make test` hid a root apt-get install."""
    import re
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "Makefile").read_text()
    stamp = text[text.index("$(STAMP):") : text.index("\ndemo:")]
    steps = re.findall(r'echo "setup (\d)/4: ([^"]*)"', stamp)
    assert sorted({int(n) for n, _ in steps}) == [1, 2, 3, 4]
    assert all(re.search(r"\((about|a few) [^)]*(s|min|seconds)\)", what) for _, what in steps[:2])
    assert "about 1-3 min" in stamp and "about 1-2 min" in stamp
    pytest_recipe = text[text.index("\npytest:") :].split("\n")[2]
    assert " -q" not in pytest_recipe and "--durations" in pytest_recipe
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        ["make", "-s", "-C", str(root), "browser", "SKIP_BROWSER=1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "browser: skipped (SKIP_BROWSER set)" in out.stdout
    assert "/usr/lib/chromium" in text and "SKIP_BROWSER=1" in text
