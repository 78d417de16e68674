"""The importance figure, ``peek importance`` and ``peek report`` showing it."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

import peekcore
from peekcore.cli import main
from peekcore.importance import ComponentImportance, component_importance
from peekcore.report.importance_figures import importance_figure

NET = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(2, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(30, 3))
    """
)


@pytest.fixture
def fitted(tmp_path, rng):
    """A small network as an import spec, its inputs, a store of its ReLU and a model of it."""
    (tmp_path / "net.py").write_text(NET)
    x = rng.standard_normal((40, 2, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    from peekcore.loading import load_model

    net = load_model(str(tmp_path / "net.py") + ":build")
    store = peekcore.capture(net, x, "1", tmp_path / "s.zarr", dtype="float32", batch_size=16)
    model = peekcore.ncp_hals(store["1"], 3, n_iter_max=20, random_state=0)
    model.save(tmp_path / "m.npz")
    return tmp_path, net, x, y, store


def run(capsys, *argv) -> dict:
    assert main(["--json", *argv]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_figure_tables(fitted):
    tmp, net, x, y, store = fitted
    imp = component_importance(net, "1", tmp / "m.npz", x, labels=y, store=store)
    assert imp.metadata["layout"] == "tokens" and imp.metadata["sample_factors"] == "model"
    fig = importance_figure(imp, tmp / "figs" / "imp", class_names=["a", "b", "c"], top_k=2)
    assert fig.png.stat().st_size > 0 and fig.svg.exists()
    rows = fig.tables["components"]
    assert len(rows) == 3
    for r, row in enumerate(rows):
        top = imp.top_classes(r, 2, "remove")
        assert row["drives (remove)"].split(" (")[0] == "abc"[top[0]]
        assert row["accuracy change (keep)"] == imp.accuracy_change["keep"][r]
    grid = fig.tables["logit_change_remove"]
    np.testing.assert_array_equal(
        [[row[f"c{r}"] for r in range(3)] for row in grid], imp.logit_change["remove"].T
    )


def test_cli_importance_and_report(fitted, capsys):
    tmp, net, x, y, store = fitted
    spec = f"{tmp / 'net.py'}:build"
    common = ["--model", spec, "--store", str(tmp / "s.zarr"), "--layer", "1"]
    out = run(
        capsys,
        "importance",
        *common,
        "--result",
        str(tmp / "m.npz"),
        "--data",
        str(tmp / "x.npy"),
        "--labels",
        str(tmp / "y.npy"),
        "--out",
        str(tmp / "imp.npz"),
    )
    info = run(capsys, "info", str(tmp / "imp.npz"))
    assert info["kind"] == "component importance" and len(info["table"]) == 3
    saved = ComponentImportance.load(tmp / "imp.npz")
    direct = component_importance(net, "1", tmp / "m.npz", x, labels=y, store=store)
    for mode in direct.modes:
        np.testing.assert_allclose(saved.logit_change[mode], direct.logit_change[mode])
    assert out["baseline_accuracy"] == pytest.approx(direct.baseline_accuracy)
    assert len(out["table"]) == 3 and out["metadata"]["sample_factors"] == "model"
    rep = run(
        capsys,
        "report",
        str(tmp / "m.npz"),
        str(tmp / "imp.npz"),
        "--labels",
        str(tmp / "y.npy"),
        "--out",
        str(tmp / "r.html"),
    )
    # the importance view sits in its model's section, named after the layer m.npz came from
    assert rep["sections"] == ["1"]
    html = (tmp / "r.html").read_text()
    assert "mean change in each class" in html and "Classes x components" in html
    assert html.index("Classes x components") < html.index("mean change in each class")
    alone = run(capsys, "report", str(tmp / "imp.npz"), "--out", str(tmp / "r2.html"))
    assert alone["sections"] == ["1 (imp.npz)"]


def test_cli_on_a_store_captured_with_labels_uses_the_models_rows(fitted, capsys):
    """A store of ``(x, y)``, and ``--data x.npy --labels y.npy``: the same data."""
    tmp, net, x, y, _ = fitted
    paired = peekcore.capture(net, (x, y), "1", tmp / "xy.zarr", dtype="float32", batch_size=16)
    peekcore.ncp_hals(paired["1"], 3, n_iter_max=20, random_state=0).save(tmp / "xy.npz")
    argv = ["--model", f"{tmp / 'net.py'}:build", "--store", str(tmp / "xy.zarr"), "--layer", "1"]
    argv += ["--result", str(tmp / "xy.npz"), "--data", str(tmp / "x.npy")]
    run(capsys, "importance", *argv, "--labels", str(tmp / "y.npy"), "--out", str(tmp / "i.npz"))
    cli = ComponentImportance.load(tmp / "i.npz")
    assert cli.metadata["sample_factors"] == "model"
    assert (cli.metadata["data_check"], cli.metadata["same_data"]) == ("inputs_fingerprint", True)
    direct = component_importance(net, "1", tmp / "xy.npz", (x, y), store=paired)
    projected = component_importance(
        net, "1", tmp / "xy.npz", (x, y), store=paired, sample_factors="project"
    )
    for name in ("logit_change", "probability_change", "accuracy_change"):
        for mode in direct.modes:
            got, want = getattr(cli, name)[mode], getattr(direct, name)[mode]
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)
    assert cli.baseline_accuracy == direct.baseline_accuracy
    assert cli.reconstruction_accuracy == direct.reconstruction_accuracy
    # what the CLI gave before: the rows projected, measurably other numbers
    assert np.abs(projected.logit_change["keep"] - direct.logit_change["keep"]).max() > 1e-4


def test_cli_importance_errors(fitted, capsys, rng):
    tmp, *_ = fitted
    spec = f"{tmp / 'net.py'}:build"
    # a model of the layer as channels x positions: the store holds it as tokens (5 x 6)
    other = peekcore.CPModel(np.ones(2), [rng.random((n, 2)) for n in (40, 6, 5)])
    other.save(tmp / "other.npz")
    argv = ["importance", "--model", spec, "--store", str(tmp / "s.zarr"), "--layer", "1"]
    argv += ["--result", str(tmp / "other.npz"), "--data", str(tmp / "x.npy")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "peek importance: error: the CP model was fitted to samples of shape (6, 5)" in err
    assert "another layout of this layer" in err
    assert main([*argv, "--out", str(tmp)]) == 1  # a folder: refused before any work
    assert "not a regular file" in capsys.readouterr().err
    argv[argv.index("1")] = "3"
    assert main(argv) == 1
    assert "no layer '3' in the store" in capsys.readouterr().err


def test_modes_keep_only_without_labels(fitted):
    tmp, net, x, _, _ = fitted
    imp = component_importance(net, "1", tmp / "m.npz", torch.as_tensor(x), modes=["keep"])
    assert imp.modes == ("keep",) and imp.metadata["sample_factors"] == "project"
    assert np.isnan(imp.reconstruction_accuracy)


@pytest.mark.slow
def test_demo_importance_view(tmp_path):
    """The demo's view: the clean network's last layer, class purity beside importance."""
    from peekcore.demo import DemoConfig, _importance_view, _train_run

    cfg = DemoConfig.small()
    data = peekcore.datasets.digits()
    x = torch.as_tensor(np.asarray(data.inputs)[:400], dtype=torch.float32)
    y = torch.as_tensor(np.asarray(data.labels)[:400], dtype=torch.int64)
    net = _train_run(x[:300], y[:300], 0, [max(cfg.epochs)], cfg)[max(cfg.epochs)]
    name = f"net0-noise0-e{max(cfg.epochs)}"
    lines: list[str] = []
    section = _importance_view(
        [{"name": name, "model": net}],
        x[300:].numpy(),
        y[300:].numpy(),
        cfg,
        tmp_path,
        lines.append,
    )
    assert [f.kind for f in section.figures] == ["class_component", "importance"]
    imp = ComponentImportance.load(tmp_path / "importance" / f"{name}_act3_importance.npz")
    assert imp.rank == max(cfg.ranks) and imp.n_classes == 10 and imp.n_samples == 100
    assert imp.metadata["sample_factors"] == "model" and imp.metadata["fold_spatial"] is True
    with torch.no_grad():
        acc = float((net(x[300:]).argmax(1) == y[300:]).float().mean())
    assert imp.baseline_accuracy == pytest.approx(acc)
    assert section.summary["baseline_accuracy"] == imp.baseline_accuracy and len(lines) == 1
    assert _importance_view([], x.numpy(), y.numpy(), cfg, tmp_path, lines.append) is None


@pytest.mark.slow
def test_demo_importance_view_takes_the_smallest_faithful_rank(tmp_path):
    """With the example sweep, the view's model is the smallest rank whose
    reconstruction keeps the network's accuracy within the tolerance (the
    sweep's own choice may leave the network near chance)."""
    from peekcore.demo import RECONSTRUCTION_TOLERANCE, DemoConfig, _importance_view, _train_run

    cfg = DemoConfig()  # trained as the full demo trains (a small net stays near chance)
    data = peekcore.datasets.digits()
    x = torch.as_tensor(np.asarray(data.inputs), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(data.labels), dtype=torch.int64)
    net = _train_run(x[:1000], y[:1000], 0, [max(cfg.epochs)], cfg)[max(cfg.epochs)]
    name = f"net0-noise0-e{max(cfg.epochs)}"
    x_te, y_te = x[1000:1400].numpy(), y[1000:1400].numpy()
    acts = peekcore.capture(net, x_te, "act3", tmp_path / "a.zarr", fold_spatial=True)
    ranks = [1, 2, 4, 8, 12, 16]
    sweep = peekcore.rank_sweep(acts["act3"], ranks=ranks, method="ncp", random_state=0)
    (tmp_path / "sweeps").mkdir()
    sweep.save(tmp_path / "sweeps" / f"{name}_act3_sweep.npz")

    section = _importance_view([{"name": name, "model": net}], x_te, y_te, cfg, tmp_path, print)
    imp = ComponentImportance.load(tmp_path / "importance" / f"{name}_act3_importance.npz")
    rank = imp.rank
    assert section.summary["rank"] == rank

    def recon(r):  # reconstruction accuracy of rank r, from component_importance itself
        sweep.model(r).save(tmp_path / f"m{r}.npz")
        return peekcore.component_importance(
            net, "act3", tmp_path / f"m{r}.npz", (x_te, y_te), store=acts, modes=("keep",)
        ).reconstruction_accuracy

    floor = imp.baseline_accuracy - RECONSTRUCTION_TOLERANCE
    assert rank < max(sweep.ranks) and imp.reconstruction_accuracy >= floor  # 12 of 16 here
    assert all(recon(r) < floor for r in sweep.ranks if r < rank)  # the smallest such rank
    chosen = sweep.chosen_rank
    assert section.summary["sweep's chosen rank"] == chosen
    assert section.summary["its reconstruction accuracy"] == pytest.approx(recon(chosen))
