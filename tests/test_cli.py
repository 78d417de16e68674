"""The peek command line: every command's happy path and its main error paths."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peekcore.cli import main, parse_ranks


def run(capsys, *argv):
    code = main(["--json", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and out.strip() else None), err


@pytest.fixture
def npy(tmp_path, rng):
    x = np.abs(rng.standard_normal((40, 6, 5))).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "digits.zarr"
    argv = "--json capture --model peekcore.demo:DigitsCNN --data digits --layers act1,act3"
    options = "--dtype float32 --fold-spatial --batch-size 512".split()
    code = main([*argv.split(), "--store", str(path), *options])
    assert code == 0
    return path


def test_parse_ranks():
    assert parse_ranks("1-4") == [1, 2, 3, 4]
    assert parse_ranks("2,4,8") == [2, 4, 8]
    assert parse_ranks("1-9:4") == [1, 5, 9]
    for bad in ("0-3", "4-2", "a", "1-", ""):
        with pytest.raises(ValueError, match="bad rank range"):
            parse_ranks(bad)


def test_fit_and_info(tmp_path, npy, capsys):
    out = tmp_path / "m.npz"
    code, res, _ = run(capsys, "fit", str(npy), "--rank", "3", "--iters", "10", "--out", str(out))
    assert code == 0 and res["rank"] == 3 and 0 < res["fit"] <= 1
    code, info, _ = run(capsys, "info", str(out))
    assert code == 0 and info["kind"] == "CP model" and info["rank"] == 3
    code, build, _ = run(capsys, "info")
    assert code == 0 and "native" in build


def test_ncp_fit_with_checkpoint(tmp_path, npy, capsys):
    ck = tmp_path / "c.npz"
    options = "--rank 2 --method ncp --iters 4".split()
    code, res, _ = run(capsys, "fit", str(npy), *options, "--checkpoint", str(ck))
    assert code == 0 and ck.exists()
    code, info, _ = run(capsys, "info", str(ck))
    assert info["kind"] == "checkpoint" and info["iteration"] == 4


def test_sweep_and_report(tmp_path, npy, capsys):
    out = tmp_path / "s.npz"
    options = "--ranks 1-3 --replicates 2 --iters 15".split()
    code, res, _ = run(capsys, "sweep", str(npy), *options, "--out", str(out))
    assert code == 0 and res["chosen_rank"] in (1, 2, 3) and len(res["table"]) == 3
    html = tmp_path / "r.html"
    labels = tmp_path / "labels.npy"
    np.save(labels, np.arange(40) % 4)
    code, rep, _ = run(capsys, "report", str(out), "--out", str(html), "--labels", str(labels))
    assert code == 0 and html.stat().st_size > 10_000


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_report_of_results_with_the_same_file_name(tmp_path, rng, capsys):
    """runA/s.npz and runB/s.npz: distinct sections and figure files, each section showing
    its own figures (they shared the names "s" and "s_sweep", and both showed run B's)."""
    labels = tmp_path / "labels.npy"
    np.save(labels, np.arange(40) % 4)
    results = []
    for run_dir, ranks in (("runA", "1-2"), ("runB", "1-4")):
        x = np.abs(rng.standard_normal((40, 6, 5))).astype(np.float32)
        np.save(tmp_path / f"{run_dir}.npy", x)
        out = tmp_path / run_dir / "s.npz"
        out.parent.mkdir()
        args = ["sweep", str(tmp_path / f"{run_dir}.npy"), "--ranks", ranks, "--replicates", "2"]
        code, _, _ = run(capsys, *args, "--iters", "10", "--out", str(out))
        assert code == 0
        results.append(str(out))
    html = tmp_path / "rep" / "report.html"
    code, rep, err = run(capsys, "report", *results, "--out", str(html), "--labels", str(labels))
    assert code == 0, err
    assert rep["sections"] == ["runA/s", "runB/s"]
    figs = sorted(p.name for p in (tmp_path / "rep" / "report_figures").glob("*.png"))
    assert figs == [
        "runA_s_classes.png",
        "runA_s_sweep.png",
        "runB_s_classes.png",
        "runB_s_sweep.png",
    ]
    page = html.read_text()
    embedded = [
        page.index(base64.b64encode((html.parent / "report_figures" / f).read_bytes()).decode())
        for f in figs
    ]
    section_b = page.index('id="layer-runB-s"')
    assert all(i < section_b for i in embedded[:2]) and all(i > section_b for i in embedded[2:])
    # the same file twice: still two distinct sections
    code, rep, err = run(capsys, "report", results[0], results[0], "--out", str(html))
    assert code == 0 and rep["sections"] == ["s", "s (2)"], err


def test_section_names():
    from peekcore.cli import section_names

    paths = [Path("/a/x/s.npz"), Path("/b/x/s.npz"), Path("/c/t.npz"), Path("/c/t.npz")]
    assert section_names(paths) == ["a/x/s", "b/x/s", "t", "t (2)"]


def test_json_output_is_strict(tmp_path, npy, capsys):
    """One replicate: stability is nan, printed as null (it was a bare NaN, not JSON)."""
    code = main(
        ["--json", "sweep", str(npy), "--ranks", "1-2", "--replicates", "1", "--iters", "5"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "NaN" not in out
    res = _strict_json(out)
    assert [row["stability"] for row in res["table"]] == [None, None]


def test_info_and_report_refuse_plain_arrays(tmp_path, npy, capsys):
    """A .npy is data, not a peekcore file: say so (it was "'numpy.ndarray' object does not
    support the context manager protocol")."""
    for argv in (["info", str(npy)], ["report", str(npy), "--out", str(tmp_path / "r.html")]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and len(err.splitlines()) == 1
        assert "is a plain NumPy array (shape (40, 6, 5), float32), not a peekcore file" in err
        assert "context manager" not in err
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    code, _, err = run(capsys, "info", str(text))
    assert code == 1 and "not a readable peekcore file" in err and "checkpoint" in err
    code, _, err = run(capsys, "report", str(text), "--out", str(tmp_path / "r.html"))
    assert code == 1 and "not a readable peekcore file" in err and "RankSweep.save" in err
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r_figures").exists()


def test_capture_store_fit_sweep(store, capsys):
    code, info, _ = run(capsys, "info", str(store))
    assert code == 0 and info["layers"]["act1"]["shape"] == [1797, 16, 64]
    options = "--layer act3 --rank 2 --method ncp --iters 5".split()
    code, res, _ = run(capsys, "fit", str(store), *options)
    assert code == 0 and res["shape"] == [1797, 32, 16]


def test_errors_are_one_clear_line(tmp_path, npy, store, capsys):
    code, _, err = run(capsys, "fit", str(store), "--layer", "act", "--rank", "2")
    assert code == 1 and "no layer 'act'" in err and "act1" in err and len(err.splitlines()) == 1
    code, _, err = run(capsys, "fit", str(store), "--rank", "2")
    assert code == 1 and "choose one with --layer" in err
    code, _, err = run(capsys, "sweep", str(tmp_path / "missing.zarr"), "--ranks", "1-2")
    assert code == 1 and "no such file or store" in err
    code, _, err = run(capsys, "sweep", str(npy), "--ranks", "5-2")
    assert code == 1 and "bad rank range" in err
    code, _, err = run(capsys, "fit", str(npy), "--rank", "0")
    assert code == 1 and "rank must be at least 1" in err
    options = "--model nope:Model --data digits --layers x".split()
    code, _, err = run(capsys, "capture", *options, "--store", str(tmp_path / "s"))
    assert code == 1 and "cannot import 'nope:Model'" in err and "current folder" in err
    assert main(["--debug", "fit", str(npy), "--rank", "0"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_bench_runs(capsys):
    options = "--samples 60 --channels 16 --space 20 --rank 3 --iters 3".split()
    code, res, _ = run(capsys, "bench", *options)
    assert code == 0 and res["peekcore_cp_als_s_per_iter"] > 0


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "peekcore", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("demo", "capture", "fit", "sweep", "report", "info", "bench"):
        assert command in out.stdout
