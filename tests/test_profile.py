"""rank_profile and RankProfile, peek profile / peek report of a profile, the demo experiment."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau, spearmanr

from peekcore import RankProfile, rank_profile
from peekcore.demo import DemoConfig, DigitsCNN, _train_run, run_demo
from peekcore.errors import InvalidArgumentError, UnsafeFileError
from peekcore.profile.checkpoints import accuracy
from peekcore.profile.measures import MEASURES

PEEK = str(Path(sys.executable).with_name("peek"))
SUMMARY_POINT_KEYS = {"layer", "checkpoint", "seed", "quality", "measures"}
SUMMARY_ASSOC_KEYS = {"layer", "measure", "rho", "tau", "p_value", "ci", "n"}


@pytest.fixture(scope="module")
def digits_small():
    from peekcore import datasets

    d = datasets.digits()
    return d.inputs[:300], d.labels[:300]


@pytest.fixture(scope="module")
def snapshots(digits_small):
    """A DigitsCNN at epochs 0, 1 and 3 of training on 300 digits (single-threaded)."""
    x, y = (torch.as_tensor(a) for a in digits_small)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_run(x, y, 0, [0, 1, 3], DemoConfig())
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_profile(snapshots, digits_small):
    x, y = digits_small
    ckpts = [
        {"name": f"e{e}", "model": m, "seed": 0, "condition": f"epoch {e}"}
        for e, m in snapshots.items()
    ]
    return rank_profile(
        ckpts,
        (x[:120], y[:120]),
        ["act1", "act3"],
        ranks=(1, 2, 3),
        replicates=2,
        quality=accuracy(x[120:], y[120:]),
        n_iter_max=8,
        n_boot=8,
        n_boot_association=100,
    )


def _rho_from_points(points, layer, measure):
    pts = [p for p in points if layer in ("all", p["layer"])]
    q = np.array([p["quality"] for p in pts], dtype=float)
    v = np.array(
        [np.nan if p["measures"][measure] is None else p["measures"][measure] for p in pts]
    )
    keep = np.isfinite(q) & np.isfinite(v)
    if keep.sum() < 3 or np.ptp(v[keep]) == 0 or np.ptp(q[keep]) == 0:
        return math.nan, int(keep.sum())
    return float(spearmanr(q[keep], v[keep]).statistic), int(keep.sum())


def test_profile_points_and_associations(tiny_profile, snapshots, digits_small):
    p = tiny_profile
    x, y = digits_small
    assert len(p.points) == 2 * 3 and p.layers == ["act1", "act3"] and p.ranks == [1, 2, 3]
    assert set(p.points[0]["measures"]) == set(MEASURES)
    # quality from the callable: the share of held-out digits classified right
    model = snapshots[3].eval()
    with torch.inference_mode():
        expect = float(
            (model(torch.as_tensor(x[120:])).argmax(1) == torch.as_tensor(y[120:])).float().mean()
        )
    assert [q["quality"] for q in p.points if q["checkpoint"] == "e3"] == [
        pytest.approx(expect)
    ] * 2
    # the labels came from the (inputs, labels) tuple, so class_components is defined
    assert all(math.isfinite(q["measures"]["class_components"]) for q in p.points)
    assert {(a.layer, a.measure) for a in p.associations} == {
        (layer, m) for layer in ("act1", "act3", "all") for m in MEASURES
    }
    for a in p.associations:
        rho, n = _rho_from_points(p.points, a.layer, a.measure)
        assert a.n == n
        if math.isfinite(rho):
            assert a.rho == pytest.approx(rho, abs=1e-12)
    # three points per layer: the verdict says so instead of claiming a finding
    assert "too few" in p.verdicts["act1"] and "no conclusion" in p.verdicts["act1"]
    assert p.curves["fit"].shape == (6, 3)
    assert np.all(np.diff(p.curves["fit"], axis=1) > -0.05)  # fit roughly grows with rank


def test_profile_save_load_round_trip(tiny_profile, tmp_path):
    path = tmp_path / "profile.npz"
    tiny_profile.save(path)
    back = RankProfile.load(path)
    assert back.points == json.loads(json.dumps(tiny_profile.points))
    assert back.verdict == tiny_profile.verdict and back.verdicts == tiny_profile.verdicts
    assert back.layers == tiny_profile.layers and back.ranks == tiny_profile.ranks
    for a, b in zip(back.associations, tiny_profile.associations, strict=True):
        for name in ("layer", "measure", "n", "verdict"):
            assert getattr(a, name) == getattr(b, name)
        for name in ("rho", "tau", "p_value", "p_adjusted"):
            assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True)
        assert np.array_equal(a.ci, b.ci, equal_nan=True)
    for k, v in tiny_profile.curves.items():
        np.testing.assert_array_equal(back.curves[k], v)
    assert back.summary() == json.loads(json.dumps(tiny_profile.summary()))
    text = str(back)
    assert back.verdict in text and "act3" in text and "ev_area" in text
    rows = back.to_records()
    assert len(rows) == len(back.points) * len(MEASURES)
    assert {"layer", "checkpoint", "seed", "quality", "measure", "value", "low", "high"} <= set(
        rows[0]
    )


def test_to_pandas(tiny_profile):
    pd = pytest.importorskip("pandas")
    df = tiny_profile.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == len(tiny_profile.to_records())


def test_profile_report_renders(tiny_profile, tmp_path):
    from peekcore.report.profile_figures import profile_report

    out = profile_report(tiny_profile, tmp_path / "r.html")
    html = out.read_text()
    # the verdict comes first, before the figures and tables
    assert html.index("Verdict: ") < html.index("<img")
    assert (tmp_path / "r_figures" / "rank_profile.png").stat().st_size > 0


def test_checkpoint_errors_say_what_to_give(snapshots):
    m = snapshots[0]
    with pytest.raises(InvalidArgumentError, match="unique"):
        rank_profile([("a", m, 0.1), ("a", m, 0.2)], np.zeros((4, 1, 8, 8)), "act1")
    with pytest.raises(InvalidArgumentError, match="no quality for checkpoints"):
        rank_profile([("a", m), ("b", m)], np.zeros((4, 1, 8, 8)), "act1")
    with pytest.raises(InvalidArgumentError, match="quality has 1 values for 2"):
        rank_profile([("a", m), ("b", m)], np.zeros((4, 1, 8, 8)), "act1", quality=[0.5])
    with pytest.raises(TypeError, match="torch.nn.Module or the path"):
        rank_profile([("a", 3, 0.5)], np.zeros((4, 1, 8, 8)), "act1")
    # a missing file is reported before any checkpoint runs
    with pytest.raises(FileNotFoundError, match="checkpoint 'b': no such file"):
        rank_profile([("a", m, 0.1), ("b", "nowhere.pt", 0.2)], np.zeros((4, 1, 8, 8)), "act1")


class _Payload:
    """Unpickling this writes a file: the proof that loading ran code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "code ran"))


def _evil_checkpoint(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"weights": _Payload(str(marker))}, path)
    assert not marker.exists()
    return path, marker


def test_untrusted_checkpoint_does_not_run_code(tmp_path, digits_small):
    path, marker = _evil_checkpoint(tmp_path)
    x, _ = digits_small
    with pytest.raises(UnsafeFileError, match="trust"):
        rank_profile([("evil", path, 0.5)], x[:20], ["act1"], builder=DigitsCNN, ranks=(1,))
    assert not marker.exists()


def _peek(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [PEEK, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_profile_and_report_end_to_end(tmp_path, snapshots):
    for e, m in snapshots.items():
        torch.save(m.state_dict(), tmp_path / f"e{e}.pt")
    args = ["--model", "peekcore.demo:DigitsCNN", "--data", "digits", "--layers", "act1,act3"]
    args += ["--ranks", "1-3", "--iters", "5", "--n-boot", "5", "--out", "p.npz"]
    res = _peek("profile", "--checkpoints", "e0.pt", "e1.pt", "e3.pt", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    profile = RankProfile.load(tmp_path / "p.npz")
    assert [p["checkpoint"] for p in profile.points][::2] == ["e0", "e1", "e3"]
    assert res.stdout.count(profile.verdict) == 1  # the console prints the verdict once
    rep = _peek("report", "p.npz", "--out", "rep.html", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    html = (tmp_path / "rep.html").read_text()
    assert "Verdict" in html and "rank_profile" not in rep.stderr
    info = _peek("--json", "info", "p.npz", cwd=tmp_path)
    assert json.loads(info.stdout)["verdict"] == profile.verdict
    # a pickled payload among the checkpoints: refused, nothing runs
    evil, marker = _evil_checkpoint(tmp_path)
    bad = _peek("profile", "--checkpoints", "e0.pt", str(evil), *args, cwd=tmp_path)
    assert bad.returncode != 0 and "--trust-model-file" in bad.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_demo_small_end_to_end(tmp_path):
    cfg = DemoConfig.small()
    lines: list[str] = []
    res = run_demo(tmp_path / "demo", cfg, log=lines.append)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary) == {"points", "associations", "max_rank", "verdict", "seconds"}
    assert summary["max_rank"] == max(cfg.ranks) and summary["verdict"] == res.verdict
    assert not any(res.verdict in line for line in lines)  # printed once, by the caller
    points = summary["points"]
    assert all(set(p) == SUMMARY_POINT_KEYS for p in points)
    assert all(set(a) == SUMMARY_ASSOC_KEYS for a in summary["associations"])
    per_layer = {layer: sum(p["layer"] == layer for p in points) for layer in ("act1", "act2")}
    assert per_layer == {"act1": cfg.points_per_layer(), "act2": cfg.points_per_layer()}
    assert len({p["seed"] for p in points}) == cfg.n_networks
    # every association's rho (and tau, n) follows from its points
    for a in summary["associations"]:
        rho, n = _rho_from_points(points, a["layer"], a["measure"])
        assert a["n"] == n
        if a["rho"] is None:
            assert math.isnan(rho)
            continue
        assert a["rho"] == pytest.approx(rho, abs=1e-12)
        pts = [p for p in points if a["layer"] in ("all", p["layer"])]
        q = [p["quality"] for p in pts if p["measures"][a["measure"]] is not None]
        v = [p["measures"][a["measure"]] for p in pts if p["measures"][a["measure"]] is not None]
        assert a["tau"] == pytest.approx(float(kendalltau(q, v).statistic), abs=1e-12)
        assert a["ci"][0] <= a["ci"][1]
    # the untrained net (epoch 0) is one point per network, and it is near chance
    untrained = [p for p in points if p["checkpoint"].endswith("untrained")]
    assert len(untrained) == 3 * cfg.n_networks and max(p["quality"] for p in untrained) < 0.3
    html = Path(res.report).read_text()
    assert html.index(res.verdict.split(",")[0]) < html.index("<img")
    assert RankProfile.load(res.profile).verdict == res.verdict


def test_profile_file_holds_nothing_to_unpickle(tiny_profile, tmp_path):
    """A profile file is an npz with a JSON header: no object arrays."""
    path = tmp_path / "p.npz"
    tiny_profile.save(path)
    with np.load(path, allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
