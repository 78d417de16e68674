"""Reports a person can read (issue 15): sections named by layer, NaN explained,
overlays that keep the image visible, integer rank ticks, markers that do not hide."""

from __future__ import annotations

import numpy as np
import pytest

import peekcore
from peekcore.model import CPModel
from peekcore.report import build_report
from peekcore.report.figures import _component_data, _draw_top_samples, _new_figure
from peekcore.report.quality_figure import _draw_quality, training_quality_tables


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A sweep and a model of one stored layer, and a model of an .npy file."""
    from peekcore.demo import DigitsCNN

    root = tmp_path_factory.mktemp("readable")
    images = peekcore.datasets.digits().inputs[:48]
    store = peekcore.capture(DigitsCNN(), images, ["act1"], root / "acts.zarr", dtype="float32")
    sweep = peekcore.rank_sweep(store["act1"], [1, 2], 1, n_iter_max=5)
    sweep.save(root / "sweep.npz")
    sweep.model().save(root / "model.npz")
    np.save(root / "x.npy", np.abs(np.random.default_rng(3).standard_normal((20, 4, 3))))
    peekcore.cp_als(root / "x.npy", 2, n_iter_max=3).save(root / "other.npz")
    return root, images[:, 0]


def test_sections_are_named_after_the_layer(results):
    """Sections were named after the files ("sweep", "model")."""
    root, _ = results
    built = build_report([root / "sweep.npz"], root / "one.html")
    assert built.sections == ["act1"]
    html = built.path.read_text()
    assert "<h2>Layer act1</h2>" in html and str((root / "acts.zarr").resolve()) in html
    built = build_report(
        [root / "sweep.npz", root / "model.npz", root / "other.npz"], root / "r.html"
    )
    assert built.sections == ["act1 (sweep)", "act1 (model)", "other"]


def test_nan_cells_are_a_dash_with_a_footnote(results):
    """Tables showed unexplained `nan` cells (stability with one replicate)."""
    root, _ = results
    html = build_report([root / "sweep.npz"], root / "nan.html").path.read_text()
    assert ">nan<" not in html and "NaN</td>" not in html
    assert 'class="num nan"' in html and "not defined (NaN)" in html
    for term in ("fit", "explained variance", "core consistency (CORCONDIA)", "stability"):
        assert f"<dt>{term}</dt>" in html


def test_overlay_keeps_the_digit_visible(results):
    """A colour map laid over the 8 x 8 digits hid them: now one grey image and contours."""
    root, images = results
    model = CPModel.load(root / "model.npz")
    d = _component_data(model, images, 0, 4, None, None, None)
    fig = _new_figure((6, 6))
    _draw_top_samples(fig, d, 0.45)
    shown = [ax for ax in fig.axes if ax.get_images()]
    assert len(shown) == 4
    for ax in shown:
        (img,) = ax.get_images()  # the sample alone, in grey
        assert img.get_cmap().name == "gray" and img.get_alpha() is None
        assert ax.collections  # the spatial factor as contour lines
    assert "spatial factor over" not in fig._suptitle.get_text()


def test_rank_ticks_are_integers_and_markers_stay_apart():
    records = [
        {"layer": layer, "checkpoint": c, "accuracy": acc, "rank": rank}
        for layer in ("act1", "act3")
        for c, acc, rank in ((1, 0.2, 2), (2, 0.6, 3), (3, 0.9, 3))
    ]
    fig = _new_figure((10, 4))
    _draw_quality(fig, training_quality_tables(records))
    fig.canvas.draw()
    ax_t, ax_s = fig.axes[0], fig.axes[1]
    for ax in (ax_t, ax_s):
        ticks = ax.get_yticks()
        assert np.allclose(ticks, np.round(ticks))
    lines = [line for line in ax_t.get_lines() if line.get_label() in ("act1", "act3")]
    assert lines[0].get_marker() != lines[1].get_marker()
    # equal ranks at equal checkpoints: the two layers' points do not coincide
    assert not np.allclose(lines[0].get_xdata(), lines[1].get_xdata())
