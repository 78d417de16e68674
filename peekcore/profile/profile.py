"""Rank profiles: rank measures of layers across checkpoints, and their link with quality.

:func:`rank_profile` captures every checkpoint's layers in one forward pass
into a store (reused when it already holds them), sweeps the rank of each
layer on the shared-pass engine (:func:`peekcore.rank_sweep`: every rank and
replicate of a layer in the same passes), takes the rank measures of each
sweep with a bootstrap over samples (:mod:`peekcore.profile.measures`), and
relates each measure to the checkpoints' quality per layer and pooled
(:mod:`peekcore.profile.association`). The result, a :class:`RankProfile`,
saves to and loads from one ``.npz``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .._io import load_npz, save_npz
from .._validate import check_device
from .._version import __version__
from ..errors import InvalidArgumentError, MissingDependencyError, UnknownNameError
from .association import Association, associate, associate_pooled, holm, summarize
from .checkpoints import accuracy, checkpoint_specs, load_spec_model, store_stem
from .measures import MEASURES, bootstrap_measures, measure_sweep

__all__ = ["RankProfile", "accuracy", "rank_profile", "UNDEFINED"]

#: Why a measure can be undefined (nan) at a point; shown wherever the value is.
UNDEFINED = {
    "autoten": "no rank passed the choice's tests",
    "fit_elbow": "no rank's fit rose above rank 1's (a flat fit curve)",
    "stable": "no rank's replicates matched (factor match score below the threshold), "
    "or a single replicate",
    "class_components": "no labels for the data",
    "ev_area": "explained variance undefined (all-zero data)",
}
#: Curves kept per point (best replicate per rank, or per rank), for figures and tables.
CURVES = ("fit", "explained_variance", "corcondia", "stability")
_FORMAT = "peekcore.RankProfile"


@dataclass
class RankProfile:
    """Rank measures of every (layer, checkpoint), and their association with quality.

    Attributes
    ----------
    points : list of dict
        One per (layer, checkpoint): ``layer``, ``checkpoint``, ``seed``,
        ``condition``, ``quality``, ``measures`` (measure -> value, nan when
        undefined), ``interval`` (measure -> ``[low, high]``, the 2.5% and 97.5%
        percentiles of the bootstrap over samples), ``info``.
    associations : list of Association
        Per layer and measure, and pooled over layers (``layer == "all"``).
    verdicts : dict of str to str
        One plain-language sentence per layer.
    verdict : str
        The overall verdict.
    layers, ranks : list
    curves : dict of str to ndarray
        ``fit``, ``explained_variance``, ``corcondia`` (best replicate per rank)
        and ``stability`` (per rank), each ``(len(points), len(ranks))``.
    quality_name : str
    settings : dict
        How the profile was made (method, replicates, iterations, bootstrap, ...).
    seconds : float
    """

    points: list[dict]
    associations: list[Association]
    verdicts: dict[str, str]
    verdict: str
    layers: list[str]
    ranks: list[int]
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    quality_name: str = "accuracy"
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    # ------------------------------------------------------------ tables
    def to_records(self) -> list[dict]:
        """A tidy table: one row per (layer, checkpoint, measure).

        Columns: ``layer``, ``checkpoint``, ``seed``, ``condition``, ``quality``,
        ``measure``, ``value``, ``low``, ``high`` (bootstrap interval).
        """
        rows = []
        for p in self.points:
            for m, v in p["measures"].items():
                lo, hi = p["interval"].get(m, (math.nan, math.nan))
                rows.append(
                    {
                        "layer": p["layer"],
                        "checkpoint": p["checkpoint"],
                        "seed": p["seed"],
                        "condition": p["condition"],
                        "quality": p["quality"],
                        "measure": m,
                        "value": v,
                        "low": lo,
                        "high": hi,
                    }
                )
        return rows

    def to_pandas(self):
        """:meth:`to_records` as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise MissingDependencyError(
                "RankProfile.to_pandas needs pandas: pip install pandas (or use to_records())"
            ) from err
        return pd.DataFrame(self.to_records())

    def association(self, layer: str, measure: str) -> Association:
        """The association of ``measure`` with quality in ``layer`` (``"all"``: pooled)."""
        for a in self.associations:
            if a.layer == layer and a.measure == measure:
                return a
        raise UnknownNameError(f"no association for layer {layer!r} and measure {measure!r}")

    def seed_spread(self) -> list[dict]:
        """Spread of each measure over training seeds, per layer and condition.

        Rows with ``layer``, ``condition``, ``measure``, ``n_seeds``, ``mean`` and
        ``sd`` (sample standard deviation over seeds; nan with one seed).
        """
        rows = []
        for layer in self.layers:
            pts = [p for p in self.points if p["layer"] == layer]
            for cond in dict.fromkeys(p["condition"] for p in pts):
                group = [p for p in pts if p["condition"] == cond]
                for m in self.measures:
                    v = np.array([p["measures"][m] for p in group], dtype=float)
                    v = v[np.isfinite(v)]
                    rows.append(
                        {
                            "layer": layer,
                            "condition": cond,
                            "measure": m,
                            "n_seeds": len({p["seed"] for p in group}),
                            "mean": float(v.mean()) if v.size else math.nan,
                            "sd": float(v.std(ddof=1)) if v.size > 1 else math.nan,
                        }
                    )
        return rows

    @property
    def measures(self) -> list[str]:
        """The measures taken, in order."""
        return list(self.points[0]["measures"]) if self.points else list(MEASURES)

    def summary(self) -> dict:
        """What ``summary.json`` holds: points, associations, max_rank, verdict, seconds.

        Exactly the keys a reader can check the associations from: each
        association's ``rho`` is Spearman's rho of the points' quality and
        measure (of its layer, or all points for ``"all"``), finite values only.
        """
        return {
            "points": [
                {k: p[k] for k in ("layer", "checkpoint", "seed", "quality", "measures")}
                for p in self.points
            ],
            "associations": [
                {
                    "layer": a.layer,
                    "measure": a.measure,
                    "rho": a.rho,
                    "tau": a.tau,
                    "p_value": a.p_value,
                    "ci": [a.ci[0], a.ci[1]],
                    "n": a.n,
                }
                for a in self.associations
            ],
            "max_rank": max(self.ranks),
            "verdict": self.verdict,
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """A readable text table: measures per point, then associations and verdicts."""
        ms = self.measures
        head = ["layer", "checkpoint", "seed", self.quality_name, *ms]
        rows = [
            [
                p["layer"],
                p["checkpoint"],
                "-" if p["seed"] is None else str(p["seed"]),
                f"{p['quality']:.3f}",
                *(_fmt(p["measures"][m]) for m in ms),
            ]
            for p in self.points
        ]
        lines = _align(head, rows)
        lines.append("")
        assoc = [
            [
                a.layer,
                a.measure,
                _fmt(a.rho, 2),
                _fmt(a.tau, 2),
                f"[{_fmt(a.ci[0], 2)}, {_fmt(a.ci[1], 2)}]",
                _fmt(a.p_value, 3),
                _fmt(getattr(a, "p_adjusted", math.nan), 3),
                str(a.n),
            ]
            for a in self.associations
        ]
        lines += _align(["layer", "measure", "rho", "tau", "95% CI", "p", "p (Holm)", "n"], assoc)
        lines.append("")
        lines += list(self.verdicts.values())  # each sentence names its layer
        lines.append(f"Verdict: {self.verdict}")
        if any(not math.isfinite(v) for p in self.points for v in p["measures"].values()):
            lines.append("- : undefined; " + "; ".join(f"{m}: {UNDEFINED[m]}" for m in ms))
        reasons = {f"{a.layer} {a.measure}": a.reason for a in self.associations if a.reason}
        if reasons:
            lines.append("rho undefined: " + "; ".join(f"{k}: {r}" for k, r in reasons.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"RankProfile({len(self.points)} points, layers={self.layers}, "
            f"ranks={self.ranks[0]}..{self.ranks[-1]}, verdict={self.verdict!r})"
        )

    # ------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile to one ``.npz`` (curves as arrays, the rest as a JSON header)."""
        header = {
            "format": _FORMAT,
            "version": 1,
            "points": self.points,
            "associations": [asdict(a) for a in self.associations],
            "verdicts": self.verdicts,
            "verdict": self.verdict,
            "layers": self.layers,
            "ranks": self.ranks,
            "quality_name": self.quality_name,
            "settings": self.settings,
            "seconds": self.seconds,
            "peekcore_version": __version__,
        }
        return save_npz(path, {f"curve_{k}": np.asarray(v) for k, v in self.curves.items()}, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RankProfile:
        """Read a profile written by :meth:`save`."""
        header, arrays = load_npz(path, _FORMAT, "rank profile")
        known = {f.name for f in fields(Association)}
        associations = []
        for d in header["associations"]:
            d = {k: v for k, v in d.items() if k in known}
            if isinstance(d.get("ci"), list):
                d["ci"] = tuple(d["ci"])
            associations.append(Association(**d))
        return cls(
            points=header["points"],
            associations=associations,
            verdicts=header["verdicts"],
            verdict=header["verdict"],
            layers=list(header["layers"]),
            ranks=[int(r) for r in header["ranks"]],
            curves={k.removeprefix("curve_"): v for k, v in arrays.items()},
            quality_name=header["quality_name"],
            settings=header["settings"],
            seconds=float(header["seconds"]),
        )


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float) and v == round(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _align(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return out


# ---------------------------------------------------------------------- the experiment


def _curves(sweep: Any) -> dict[str, np.ndarray]:
    idx = np.arange(len(sweep.ranks))
    best = np.asarray(sweep.best, dtype=int)
    return {
        "fit": np.asarray(sweep.fit)[idx, best],
        "explained_variance": np.asarray(sweep.explained_variance)[idx, best],
        "corcondia": np.asarray(sweep.corcondia)[idx, best],
        "stability": np.asarray(sweep.stability, dtype=float),
    }


def _interval(draws: np.ndarray) -> list[float]:
    d = np.asarray(draws, dtype=float)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return [math.nan, math.nan]
    lo, hi = np.percentile(d, [2.5, 97.5])
    return [float(lo), float(hi)]


def _associations(
    points: list[dict], layers: list[str], measures: Sequence[str], kw: dict
) -> list[Association]:
    """Per layer and measure (seeds as groups), then pooled (within layer, seed); Holm."""
    out = []
    for layer in layers:
        pts = [p for p in points if p["layer"] == layer]
        seeds = [p["seed"] for p in pts]
        groups = None if all(s is None for s in seeds) else [str(s) for s in seeds]
        quality = np.array([p["quality"] for p in pts], dtype=float)
        for m in measures:
            values = np.array([p["measures"][m] for p in pts], dtype=float)
            out.append(associate(quality, values, layer=layer, measure=m, groups=groups, **kw))
    quality = np.array([p["quality"] for p in points], dtype=float)
    seeds = [p["seed"] for p in points]
    for m in measures:
        values = np.array([p["measures"][m] for p in points], dtype=float)
        out.append(
            associate_pooled(
                quality,
                values,
                [p["layer"] for p in points],
                measure=m,
                seeds=None if all(s is None for s in seeds) else [str(s) for s in seeds],
                **kw,
            )
        )
    return holm(out)


def _checkpoint_line(points: list[dict], spec: Any, quality_name: str) -> str:
    """The log line of one checkpoint: its quality and each layer's autoten rank."""
    summary = ", ".join(f"{p['layer']} {_fmt(p['measures']['autoten'])}" for p in points)
    return f"[profile] {spec.name}: {quality_name} {spec.quality:.3f}; autoten rank {summary}"


def rank_profile(
    checkpoints: Sequence[Any],
    data: Any,
    layers: str | Sequence[str],
    *,
    ranks: Sequence[int] = tuple(range(1, 21)),
    replicates: int = 2,
    quality: Any = None,
    method: str = "ncp",
    store: str | os.PathLike | None = None,
    labels: Any = None,
    builder: Any = None,
    trust: bool = False,
    quality_name: str = "accuracy",
    n_iter_max: int = 50,
    tol: float = 1e-5,
    compress: bool = False,
    n_boot: int = 200,
    n_permutations: int = 2000,
    n_boot_association: int = 2000,
    fraction: float = 0.95,
    fms_threshold: float = 0.9,
    random_state: int = 0,
    capture_options: dict | None = None,
    sweep_options: dict | None = None,
    sweep_dir: str | os.PathLike | None = None,
    save_sweeps: Sequence[str] | None = None,
    progress: bool | None = False,
    log: Callable[[str], Any] | None = None,
) -> RankProfile:
    """Rank measures of ``layers`` at every checkpoint, and their association with quality.

    Parameters
    ----------
    checkpoints : sequence
        ``(name, model)``, ``(name, model, quality)``, or dicts with ``name``,
        ``model`` and optionally ``quality``, ``seed`` (the training seed; the
        tests treat points of one seed as a group), ``condition`` (what the
        checkpoint is apart from its seed) and ``info``. A model is an
        ``nn.Module`` or the path of a ``torch.save``'d file: a state dict
        loaded into ``builder()`` with ``weights_only=True``, or a whole pickled
        model only with ``trust=True`` (unpickling can run any code).
    data : array, tuple, Dataset or DataLoader
        The inputs every checkpoint is run on (:func:`peekcore.capture`); a
        ``(inputs, labels)`` tuple also gives the labels.
    layers : str or sequence of str
        Module names (``model.get_submodule``).
    ranks : sequence of int
        Ranks swept per (layer, checkpoint); default 1 to 20.
    replicates : int
        Random restarts per rank (two or more for the ``stable`` measure).
    quality : None, sequence of float or callable
        Quality per checkpoint (when not given with each checkpoint), or
        ``(model) -> float``, e.g. :func:`accuracy` on held-out labelled data.
    method : {"ncp", "cp"}
        Nonnegative CP (HALS; for activations after a ReLU) or CP-ALS.
    store : path, optional
        Folder of the activation stores, one ``<checkpoint>.zarr`` per
        checkpoint; a store already there from the same model, data and
        settings is reused, one from other weights is refused. Default: a
        temporary folder, removed at the end.
    labels : array, optional
        ``(N,)`` class labels of ``data`` for ``class_components`` (default:
        the labels the store recorded, if any).
    builder : callable, optional
        Returns a fresh model to load state-dict files into.
    trust : bool
        Allow whole pickled model files.
    n_iter_max, tol, compress
        Per sweep (:func:`peekcore.rank_sweep`; ``compress`` only with ``method="cp"``).
    n_boot : int
        Bootstrap draws over samples per sweep (:func:`measures.bootstrap_measures`).
    n_permutations, n_boot_association : int
        For the association tests (:func:`association.associate`).
    fraction, fms_threshold : float
        Rules of ``fit_elbow`` and ``stable``.
    random_state : int
        Seeds the sweeps, the bootstrap and the tests.
    capture_options, sweep_options : dict, optional
        More keyword arguments for :func:`peekcore.capture` (default
        ``dtype="float32"``, ``fold_spatial=True``) and :func:`peekcore.rank_sweep`.
    sweep_dir : path, optional
        Also save sweeps there as ``<checkpoint>_<layer>_sweep.npz``.
    save_sweeps : sequence of str, optional
        Names of the checkpoints whose sweeps are saved (default: all).
    progress : bool, optional
        Progress bars of the sweeps.
    log : callable, optional
        Gets one line per checkpoint.

    Returns
    -------
    RankProfile
    """
    from .. import capture

    t0 = time.perf_counter()
    specs, quality_fn = checkpoint_specs(checkpoints, quality)
    layer_list = [layers] if isinstance(layers, str) else list(layers)
    if not layer_list:
        raise InvalidArgumentError("layers is empty: name at least one layer, e.g. ['layer3']")
    cap_kw = {"dtype": "float32", "fold_spatial": True, "batch_size": 256}
    for opts, what in ((capture_options, "capture_options"), (sweep_options, "sweep_options")):
        if (opts or {}).get("device") is not None:  # refused before the first checkpoint runs
            check_device(opts["device"], f"{what}['device']")
    plan = _Plan(
        layers=layer_list,
        ranks=sorted(int(r) for r in ranks),
        replicates=replicates,
        sweep_kw={
            "method": method,
            "random_state": random_state,
            "progress": progress,
            "n_iter_max": n_iter_max,
            "tol": tol,
            "compress": compress,
            **(sweep_options or {}),
        },
        measure_kw={"fraction": fraction, "fms_threshold": fms_threshold},
        n_boot=n_boot,
        random_state=random_state,
        sweep_dir=None if sweep_dir is None else Path(sweep_dir),
        save_sweeps=save_sweeps,
    )
    tmp = tempfile.TemporaryDirectory(prefix="peek-profile-") if store is None else None
    root = Path(tmp.name if tmp is not None else store)
    root.mkdir(parents=True, exist_ok=True)
    if plan.sweep_dir is not None:
        plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        for spec in specs:
            t = time.perf_counter()
            model = load_spec_model(spec, builder, trust)
            if spec.quality is None:
                spec.quality = float(quality_fn(model))
            plan.timing["load_and_quality"] += time.perf_counter() - t
            t = time.perf_counter()
            acts = capture(
                model,
                data,
                layer_list,
                root / f"{store_stem(spec.name)}.zarr",
                progress=False,
                **{**cap_kw, **(capture_options or {})},
            )
            plan.timing["capture"] += time.perf_counter() - t
            del model
            lab = labels if labels is not None else acts.labels
            for layer in layer_list:
                _profile_layer(plan, spec, acts[layer], layer, lab)
            if log is not None:
                log(_checkpoint_line(plan.points[-len(layer_list) :], spec, quality_name))
    finally:
        if tmp is not None:
            tmp.cleanup()
    t = time.perf_counter()
    assoc_kw = {
        "n_permutations": n_permutations,
        "n_boot": n_boot_association,
        "random_state": random_state,
        "quality_name": quality_name,
    }
    associations = _associations(plan.points, layer_list, MEASURES, assoc_kw)
    verdicts, verdict = summarize(associations, quality_name=quality_name)
    plan.timing["association"] = time.perf_counter() - t
    settings = {
        **{k: v for k, v in plan.sweep_kw.items() if k != "progress"},
        "replicates": replicates,
        "n_boot": n_boot,
        "n_permutations": n_permutations,
        "n_boot_association": n_boot_association,
        **plan.measure_kw,
        "capture": {k: v for k, v in cap_kw.items() if isinstance(v, (str, int, float, bool))},
        "seconds_by_step": plan.timing,
    }
    n, k = len(plan.points), len(plan.ranks)
    return RankProfile(
        points=plan.points,
        associations=associations,
        verdicts=dict(verdicts),
        verdict=verdict,
        layers=layer_list,
        ranks=plan.ranks,
        curves={c: np.array(v, dtype=float).reshape(n, k) for c, v in plan.curves.items()},
        quality_name=quality_name,
        settings=json.loads(json.dumps(settings, default=str)),
        seconds=time.perf_counter() - t0,
    )


@dataclass
class _Plan:
    """The settings of one profile run, and what it has measured so far."""

    layers: list[str]
    ranks: list[int]
    replicates: int
    sweep_kw: dict
    measure_kw: dict
    n_boot: int
    random_state: int
    sweep_dir: Path | None
    save_sweeps: Sequence[str] | None
    points: list[dict] = field(default_factory=list)
    curves: dict[str, list] = field(default_factory=lambda: {k: [] for k in CURVES})
    timing: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("load_and_quality", "capture", "sweeps", "bootstrap"), 0.0
        )
    )


def _profile_layer(plan: _Plan, spec: Any, source: Any, layer: str, labels: Any) -> None:
    """Sweep one layer of one checkpoint, take its measures and their bootstrap."""
    from ..sweep import rank_sweep

    t = time.perf_counter()
    with warnings.catch_warnings():
        # expected above a layer's identifiable ranks: nan there, and no measure needs it
        warnings.filterwarnings("ignore", "core consistency is undefined", RuntimeWarning)
        sweep = rank_sweep(source, plan.ranks, plan.replicates, **plan.sweep_kw)
    plan.timing["sweeps"] += time.perf_counter() - t
    if plan.sweep_dir is not None and (plan.save_sweeps is None or spec.name in plan.save_sweeps):
        sweep.save(plan.sweep_dir / f"{store_stem(spec.name)}_{layer}_sweep.npz")
    t = time.perf_counter()
    values = measure_sweep(sweep, labels=labels, **plan.measure_kw)
    draws = bootstrap_measures(
        sweep,
        source,
        labels=labels,
        n_boot=plan.n_boot,
        random_state=plan.random_state,
        **plan.measure_kw,
    )
    plan.timing["bootstrap"] += time.perf_counter() - t
    plan.points.append(
        {
            "layer": layer,
            "checkpoint": spec.name,
            "seed": spec.seed,
            "condition": spec.condition,
            "quality": float(spec.quality),
            "measures": {m: float(values[m]) for m in MEASURES},
            "interval": {m: _interval(draws[m]) for m in MEASURES if m in draws},
            "info": spec.info,
        }
    )
    for k, v in _curves(sweep).items():
        plan.curves[k].append(v)
