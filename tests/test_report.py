"""peekcore.report: figures from result files, the self-contained HTML report, exports."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from peekcore.model import CPModel
from peekcore.report import (
    LayerSection,
    class_component_figure,
    component_figure,
    component_figures,
    from_npz,
    load_xarray,
    rank_sweep_figure,
    save_xarray,
    summary_json,
    to_npz,
    to_tensorly,
    to_xarray,
    training_quality_figure,
    write_report,
)
from peekcore.sweep import rank_sweep

pytest.importorskip("matplotlib")

N, SHAPE, RANK = 60, (60, 8, 7, 7), 4
CLASSES = ["zero", "one", "two", "three"]
RECORDS = [
    {"layer": layer, "checkpoint": ckpt, "accuracy": acc, "rank": rank + offset}
    for layer, offset in (("conv1", 0), ("conv2", 3))
    for ckpt, acc, rank in zip([1, 2, 5, 10], [0.31, 0.52, 0.70, 0.81], [3, 5, 4, 8], strict=True)
]


def _random_model(rng, shape, rank, nonneg=True):
    draw = rng.random if nonneg else rng.standard_normal
    return CPModel(rng.random(rank) + 0.5, [draw((n, rank)) for n in shape])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small saved model and sweep, every figure made from the files, and the report."""
    rng = np.random.default_rng(2018)
    root = tmp_path_factory.mktemp("report")
    model = _random_model(rng, SHAPE, RANK)
    model.save(root / "model.npz")
    sweep = rank_sweep(rng.random((30, 6, 5)), [1, 2, 3], replicates=2, n_iter_max=20)
    sweep.save(root / "sweep.npz")
    images = rng.random((N, 28, 28))
    labels = np.repeat(np.arange(len(CLASSES)), N // len(CLASSES))
    figs = root / "figures"
    out = {
        "sweep": rank_sweep_figure(root / "sweep.npz", figs / "sweep"),
        "classes": class_component_figure(root / "model.npz", labels, figs / "classes", CLASSES),
        "training": training_quality_figure(RECORDS, figs / "training"),
    }
    comps = component_figures(
        root / "model.npz", images, figs, components=[0, 2], labels=labels, class_names=CLASSES
    )
    out["component_0"], out["component_2"] = comps
    settings = {"data": "synthetic", "ranks": [1, 2, 3], "replicates": 2, "nested": {"a": 1}}
    layers = [
        LayerSection(
            name="conv 1",
            summary={"shape": list(SHAPE), "chosen_rank": RANK, "fit": 0.5},
            figures=[out["sweep"], out["classes"]],
            components=comps,
        ),
        {"name": "conv2", "summary": {"chosen_rank": 2}, "figures": [out["sweep"]]},
    ]
    report = write_report(
        root / "report.html",
        title="Synthetic <report>",
        settings=settings,
        layers=layers,
        figures=[out["training"]],
    )
    return {
        "root": root,
        "model": model,
        "sweep": sweep,
        "images": images,
        "labels": labels,
        "figures": out,
        "report": report,
        "layers": layers,
        "settings": settings,
    }


def _png_pixels(path):
    from matplotlib.image import imread

    return imread(path)


def _assert_not_blank(path):
    px = _png_pixels(path)
    assert px.ndim == 3 and px.shape[0] > 50 and px.shape[1] > 50
    assert float(px[..., :3].var()) > 0
    # a real picture, not a few specks: some share of the pixels is not background
    background = px[0, 0, :3]
    assert np.mean(np.any(np.abs(px[..., :3] - background) > 0.05, axis=-1)) > 0.01


# ---------------------------------------------------------------------- figures


@pytest.mark.parametrize("name", ["sweep", "classes", "training", "component_0", "component_2"])
def test_figure_writes_png_and_svg(run, name):
    fig = run["figures"][name]
    assert fig.png.suffix == ".png" and fig.svg.suffix == ".svg"
    assert fig.png.stat().st_size > 1000 and fig.svg.stat().st_size > 1000
    assert fig.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = fig.svg.read_text()
    assert "<svg" in svg and svg.rstrip().endswith("</svg>")
    _assert_not_blank(fig.png)
    assert fig.tables and all(rows for rows in fig.tables.values())


def test_rank_sweep_figure_tables(run):
    fig, sweep = run["figures"]["sweep"], run["sweep"]
    for row, expect in zip(fig.tables["ranks"], sweep.table(), strict=True):
        assert {k: row[k] for k in expect} == pytest.approx(expect, nan_ok=True)
        # shown clipped to [0, 100]; the raw value stays in corcondia
        assert row["core_consistency"] == pytest.approx(min(max(row["corcondia"], 0), 100))
    assert len(fig.tables["replicates"]) == len(sweep.ranks) * sweep.replicates
    assert fig.stats["chosen_rank"] == sweep.chosen_rank
    # the same figure from the live object and from the saved file: same tables
    again = rank_sweep_figure(sweep, run["root"] / "again" / "sweep.png")
    assert again.png.name == "sweep.png" and again.svg.name == "sweep.svg"
    assert [r["fit"] for r in again.tables["ranks"]] == [r["fit"] for r in fig.tables["ranks"]]


def test_component_figure_picks_top_samples_and_spatial_map(run):
    model, fig = run["model"], run["figures"]["component_2"]
    a, c, d = model.factors[0][:, 2], model.factors[2][:, 2], model.factors[3][:, 2]
    top = [row["sample"] for row in fig.tables["top_samples"]]
    assert top == np.argsort(-a, kind="stable")[:9].tolist()
    assert [row["label"] for row in fig.tables["top_samples"]] == [
        CLASSES[run["labels"][i]] for i in top
    ]
    spatial = np.array([[row[f"x{x}"] for x in range(7)] for row in fig.tables["spatial_map"]])
    np.testing.assert_allclose(spatial, np.outer(c, d))
    assert fig.component == 2 and fig.png.name == "component_2.png"


def test_component_figure_signed_3way_model(rng, tmp_path):
    model = _random_model(rng, (20, 5, 12), 3, nonneg=False)  # space 12 = 3 x 4
    images = rng.integers(0, 256, (20, 3, 24, 32), dtype=np.uint8)  # N x C x H x W
    fig = component_figure(
        model, images, 1, spatial_shape=(3, 4), top_k=4, out_stem=tmp_path / "c1"
    )
    top = [row["sample"] for row in fig.tables["top_samples"]]
    assert top == np.argsort(-np.abs(model.factors[0][:, 1]), kind="stable")[:4].tolist()
    assert fig.stats["signed"] is True
    spatial = np.array([[row[f"x{x}"] for x in range(4)] for row in fig.tables["spatial_map"]])
    np.testing.assert_allclose(spatial, model.factors[2][:, 1].reshape(3, 4))
    _assert_not_blank(fig.png)
    # channels-last images and a 2-way model (no spatial mode) work too
    flat = _random_model(rng, (6, 5), 2)
    fig = component_figure(flat, rng.random((6, 16, 16, 3)), 0, out_stem=tmp_path / "flat")
    assert len(fig.tables["top_samples"]) == 6 and "spatial_map" not in fig.tables


def test_figure_errors_say_what_to_do(run, rng, tmp_path):
    model, images, labels = run["model"], run["images"], run["labels"]
    with pytest.raises(ValueError, match=r"component 4 is out of range .* use 0\.\.3"):
        component_figure(model, images, 4, out_stem=tmp_path / "x")
    with pytest.raises(ValueError, match="images has 59 samples but the model's sample mode has"):
        component_figure(model, images[:59], 0, out_stem=tmp_path / "x")
    with pytest.raises(ValueError, match="expected N x H x W"):
        component_figure(model, images[:, :, :, None, None], 0, out_stem=tmp_path / "x")
    with pytest.raises(ValueError, match="labels are required"):
        class_component_figure(model, None, tmp_path / "x")
    with pytest.raises(ValueError, match=r"labels has shape \(59,\) but the model has 60"):
        class_component_figure(model, labels[:59], tmp_path / "x")
    missing = labels.astype(float)
    missing[[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"2 missing entries .* \[3, 7\]"):
        class_component_figure(model, missing, tmp_path / "x")
    with pytest.raises(ValueError, match="has no name in class_names"):
        class_component_figure(model, labels, tmp_path / "x", class_names=["a", "b"])
    three_way = _random_model(rng, (60, 8, 10), 2)
    with pytest.raises(ValueError, match=r"not a square: pass spatial_shape=\(H, W\)"):
        component_figure(three_way, images, 0, out_stem=tmp_path / "x")
    with pytest.raises(ValueError, match=r"record 1 lacks \['rank'\]"):
        training_quality_figure(
            [RECORDS[0], {"layer": "a", "checkpoint": 1, "accuracy": 0.5}], tmp_path / "x"
        )
    with pytest.raises(TypeError, match="expected a rank sweep"):
        rank_sweep_figure(run["root"] / "model.npz", tmp_path / "x")
    assert not list(tmp_path.iterdir())  # nothing written on any error


def test_training_quality_spearman(run, tmp_path):
    from scipy.stats import spearmanr

    fig = run["figures"]["training"]
    rows = {row["layer"]: row for row in fig.tables["spearman"]}
    conv1 = [r for r in RECORDS if r["layer"] == "conv1"]
    expect = spearmanr([r["accuracy"] for r in conv1], [r["rank"] for r in conv1])
    assert rows["conv1"]["rho"] == pytest.approx(expect.statistic)
    assert rows["conv1"]["p_value"] == pytest.approx(expect.pvalue)
    pooled = spearmanr([r["accuracy"] for r in RECORDS], [r["rank"] for r in RECORDS])
    assert rows["all layers"]["rho"] == pytest.approx(pooled.statistic)
    assert rows["all layers"]["n"] == len(RECORDS)
    # a constant rank has no correlation: nan with a note, and no warning
    flat = [{**r, "rank": 5} for r in RECORDS if r["layer"] == "conv1"]
    out = training_quality_figure(flat, tmp_path / "flat")
    assert math.isnan(out.stats["spearman"]["conv1"]["rho"])
    assert out.stats["spearman"]["conv1"]["note"] == "constant values"


# ---------------------------------------------------------------------- report

_EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


def test_report_is_self_contained_and_linked(run):
    text = run["report"].read_text(encoding="utf-8")
    assert not _EXTERNAL.search(text)
    assert "@import" not in text and "url(" not in text and "<script" not in text
    # every figure embedded, byte for byte
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    figs = run["figures"]
    expected = ["training", "sweep", "classes", "component_0", "component_2", "sweep"]
    assert embedded == [base64.b64encode(figs[k].png.read_bytes()).decode() for k in expected]
    # the tables behind the figures, the settings, escaped text
    for name in ("ranks", "replicates", "top_samples", "top_channels", "class_means", "spearman"):
        assert f"Table: {name} (" in text
    assert text.count("<table") >= 12
    assert "Synthetic &lt;report&gt;" in text and "<report>" not in text
    # settings as a readable table: nested dicts as nested tables, lists as text, no JSON
    assert "synthetic" in text and "{&quot;a&quot;: 1}" not in text
    assert '<th>nested</th><td><div class="scroll"><table class="kv"><tbody><tr><th>a</th>' in text
    assert "<th>ranks</th><td>1, 2, 3</td>" in text
    # the definitions, linked from the contents
    assert 'href="#definitions"' in text and "<dt>core consistency (CORCONDIA)</dt>" in text
    # every internal link lands on an element; layers link to components and back
    ids = re.findall(r'\bid="([^"]+)"', text)
    assert len(ids) == len(set(ids))
    targets = set(re.findall(r'href="#([^"]+)"', text))
    assert targets <= set(ids)
    assert {"layer-conv-1", "layer-conv2", "layer-conv-1-component-0"} <= targets
    assert "layer-conv-1-component-2" in targets and "settings" in targets
    section = text[text.index('id="layer-conv-1-component-2"') :]
    assert section.index('href="#layer-conv-1"') < section.index("</section>")


def test_report_with_inline_svg(run, tmp_path):
    figs = [run["figures"]["component_0"], run["figures"]["component_2"]]
    path = write_report(
        tmp_path / "svg.html",
        title="svg",
        settings={},
        figure_format="svg",
        layers=[{"name": "a", "components": figs}, {"name": "a", "components": figs[:1]}],
    )
    text = path.read_text(encoding="utf-8")
    assert text.count("<svg") == 3 and "<?xml" not in text and "<!DOCTYPE svg" not in text
    assert not _EXTERNAL.search(text)
    ids = re.findall(r'\bid="([^"]+)"', text)
    assert len(ids) == len(set(ids))  # the two copies' ids were made unique
    refs = set(re.findall(r'href="#([^"]+)"', text)) | set(re.findall(r"url\(#([^)]+)\)", text))
    assert refs <= set(ids)


def test_report_errors(run, tmp_path):
    with pytest.raises(ValueError, match="needs 'name'"):
        write_report(tmp_path / "r.html", title="t", settings={}, layers=[{"figures": []}])
    with pytest.raises(FileNotFoundError, match="write the figures before the report"):
        write_report(
            tmp_path / "r.html",
            title="t",
            settings={},
            layers=[{"name": "a", "figures": [tmp_path / "missing.png"]}],
        )
    assert not (tmp_path / "r.html").exists()


def test_files_that_are_not_peekcore_results_say_so(run, tmp_path):
    """A plain .npy gave "'numpy.ndarray' object does not support the context manager
    protocol"; a text file, a message about pickles."""
    from peekcore.report import load_result

    array = tmp_path / "x.npy"
    np.save(array, np.zeros((3, 4), np.float32))
    text = tmp_path / "t.txt"
    text.write_text("hello")
    other = tmp_path / "o.npz"
    np.savez(other, a=np.zeros(2))
    plain = r"x.npy is a plain NumPy array \(shape \(3, 4\), float32\), not a peekcore file"

    def figure(path):
        return rank_sweep_figure(path, tmp_path / "figure")

    for load in (load_result, figure, from_npz):
        with pytest.raises(ValueError, match=plain):
            load(array)
        with pytest.raises(ValueError, match="not a readable peekcore file .not an .npz archive"):
            load(text)
        with pytest.raises(ValueError, match="without a peekcore header"):
            load(other)
    with pytest.raises(ValueError, match="give a .npz file written by CPModel.save or RankSweep"):
        load_result(array)
    with pytest.raises(ValueError, match="give a file written by peekcore.report.to_npz"):
        from_npz(array)


def _chromium():
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _render(exe, page, png, profile):
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--hide-scrollbars",
        "--window-size=1280,1600",
        "--virtual-time-budget=3000",
        f"--screenshot={png}",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    return proc, console


@pytest.mark.skipif(
    _chromium() is None,
    reason="Chromium is not installed (Debian: apt-get install -y chromium); "
    "the report's browser rendering test needs it",
)
def test_report_renders_in_chromium(run, tmp_path):
    exe = _chromium()
    # the check can see errors: a page with a failing script is caught
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        "<p>x</p><script>console.error('boom'); notDefined();</script></body></html>"
    )
    proc, console = _render(exe, bad, tmp_path / "bad.png", tmp_path / "profile-bad")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any("notDefined" in ln for ln in console), proc.stderr[-2000:]

    shot = tmp_path / "report.png"
    proc, console = _render(exe, run["report"], shot, tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console == [], "\n".join(console)
    _assert_not_blank(shot)


# ---------------------------------------------------------------------- exports


def test_npz_roundtrip(run, tmp_path):
    model = run["model"]
    ids = np.array([f"img_{i:03d}.png" for i in range(N)])
    path = to_npz(
        run["root"] / "model.npz", tmp_path / "out" / "m.npz", labels=run["labels"], sample_ids=ids
    )
    with np.load(path, allow_pickle=False) as data:  # readable without peekcore
        assert list(data["dims"]) == ["sample", "channel", "y", "x"]
        np.testing.assert_array_equal(data["A"], model.factors[0])
        np.testing.assert_array_equal(data["D"], model.factors[3])
    back, extras = from_npz(path)
    np.testing.assert_array_equal(back.weights, model.weights)
    for f, g in zip(back.factors, model.factors, strict=True):
        np.testing.assert_array_equal(f, g)
    np.testing.assert_array_equal(extras["labels"], run["labels"])
    np.testing.assert_array_equal(extras["sample_ids"], ids)
    with pytest.raises(ValueError, match="name 3 modes but the model has 4"):
        to_npz(model, tmp_path / "bad.npz", dims=("sample", "channel", "space"))


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_xarray_roundtrip(run, tmp_path, suffix):
    model = run["model"]
    ids = np.arange(100, 100 + N)
    ds = to_xarray(
        run["root"] / "model.npz", labels=run["labels"], sample_ids=ids, class_names=CLASSES
    )
    assert dict(ds.sizes) == {
        "component": RANK,
        "sample": 60,
        "channel": 8,
        "y": 7,
        "x": 7,
        "iteration": 0,
    }
    assert ds["A"].dims == ("sample", "component") and ds["D"].dims == ("x", "component")
    assert ds["weights"].dims == ("component",)
    path = save_xarray(ds, tmp_path / f"model{suffix}")
    save_xarray(ds, path)  # replaces the earlier one
    back = load_xarray(path)
    for var in ("A", "B", "C", "D", "weights"):
        assert back[var].dims == ds[var].dims
        np.testing.assert_array_equal(back[var].values, ds[var].values)
    np.testing.assert_array_equal(back["sample"].values, ids)
    assert [str(v) for v in back["class_name"].values] == [CLASSES[i] for i in run["labels"]]
    np.testing.assert_array_equal(back["label"].values, run["labels"])
    assert back.attrs["rank"] == RANK and json.loads(back.attrs["factor_dims"])["C"] == "y"
    # selection by name works as xarray users expect
    np.testing.assert_array_equal(back["A"].sel(sample=103).values, model.factors[0][3])


def test_xarray_three_way_spatial_map(rng):
    model = _random_model(rng, (10, 4, 6), 2)
    ds = to_xarray(model, spatial_shape=(2, 3))
    assert ds["C"].dims == ("space", "component")
    assert ds["spatial_map"].dims == ("y", "x", "component")
    np.testing.assert_array_equal(
        ds["spatial_map"].values[..., 1], model.factors[2][:, 1].reshape(2, 3)
    )
    with pytest.raises(ValueError, match="labels has shape"):
        to_xarray(model, labels=[1, 2])


def test_tensorly_roundtrip(run):
    tl = pytest.importorskip("tensorly")
    cp = to_tensorly(run["root"] / "model.npz")
    np.testing.assert_allclose(tl.cp_to_tensor(cp), run["model"].reconstruct(), rtol=1e-12)


def test_summary_json(run, tmp_path):
    path = tmp_path / "summary.json"
    out = summary_json(
        {"conv1": run["root"] / "sweep.npz", "conv2": run["model"]},
        path,
        settings=run["settings"],
        labels=None,
        top_k=3,
    )
    text = path.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert data == out
    assert data["layers"]["conv1"]["sweep"]["chosen_rank"] == run["sweep"].chosen_rank
    comps = data["layers"]["conv2"]["components"]
    assert len(comps) == RANK and len(comps[0]["top_samples"]) == 3
    a = run["model"].factors[0]
    assert comps[1]["top_samples"] == np.argsort(-a[:, 1], kind="stable")[:3].tolist()
    labelled = summary_json(run["model"], labels=run["labels"], class_names=CLASSES)
    layer = labelled["layers"]["layer"]
    assert layer["components"][0]["dominant_class"] in CLASSES
    assert 0 < layer["components"][0]["purity"] <= 1


@pytest.mark.slow  # a fresh interpreter: 5-6 s
def test_report_is_an_attribute_of_peekcore_loaded_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, peekcore; before = 'matplotlib' in sys.modules; "
        "r = peekcore.report; print(before, r.__name__, callable(r.write_report))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "peekcore.report", "True"]
    import peekcore

    with pytest.raises(AttributeError, match="no attribute 'reprot'"):
        peekcore.reprot  # noqa: B018
