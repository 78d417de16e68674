"""The embedded demo: does the rank of a layer's activations track how well the net was trained?

With no download: a small CNN is trained on scikit-learn's bundled handwritten
digits to several levels of quality (untrained, briefly trained, well trained,
and trained on shuffled labels); every convolutional layer's activations on
held-out digits (after each ReLU, so nonnegative) are captured into activation
stores as samples x channels x positions; a nonnegative CP rank sweep with an
automatic rank choice runs on each; a report shows the sweeps, the components
of the well-trained network, and the chosen rank per layer against test
accuracy, with the rank correlation. The finding is stated as measured,
whatever its direction (Saini and Papalexakis report that better-trained
networks show different, characteristic ranks).

Deterministic for a given seed (single-threaded training, seeded everything).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import atomic_write

__all__ = ["DemoConfig", "DigitsCNN", "run_demo", "CHECKPOINTS"]

#: (name, epochs, shuffled labels)
CHECKPOINTS = (
    ("untrained", 0, False),
    ("brief", 3, False),
    ("well-trained", 40, False),
    ("shuffled-labels", 40, True),
)
LAYERS = ("act1", "act2", "act3")


@dataclass
class DemoConfig:
    """Sizes of the demo (``small()`` for the test suite)."""

    seed: int = 0
    ranks: tuple[int, ...] = tuple(range(1, 9))
    replicates: int = 2
    n_iter_max: int = 100
    tol: float = 1e-6
    method: str = "ncp"
    checkpoints: tuple = CHECKPOINTS
    train_size: int = 1200
    batch_size: int = 64
    components_shown: int = 4

    @classmethod
    def small(cls, seed: int = 0) -> DemoConfig:
        return cls(
            seed=seed,
            ranks=(1, 2, 3, 4),
            replicates=2,
            n_iter_max=30,
            checkpoints=(("untrained", 0, False), ("brief", 2, False)),
            components_shown=2,
        )


class DigitsCNN(nn.Module):
    """Three convolutional layers for 8 x 8 digits; the ReLUs are the captured layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.act3 = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) -> (N, 10)
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(self.act3(self.conv3(self.pool(x))))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, cfg: DemoConfig):
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


@dataclass
class DemoResult:
    """What the demo measured (also written to ``summary.json``)."""

    out_dir: str
    accuracy: dict[str, float] = field(default_factory=dict)
    chosen_rank: dict[str, dict[str, int]] = field(default_factory=dict)
    correlation: dict[str, float | None] = field(default_factory=dict)
    finding: str = ""
    report: str = ""
    seconds: float = 0.0


def _spearman(accuracy: list[float], ranks: list[int]) -> tuple[float | None, str]:
    """Spearman's rho of chosen rank against accuracy, and how to say it.

    None, with the reason, when it is undefined: fewer than 3 checkpoints (two
    points always give +-1, which says nothing), or accuracy or rank the same at
    every checkpoint (no ranking to correlate).
    """
    from scipy.stats import spearmanr

    n = len(accuracy)
    if n < 3:
        return None, f"undefined with {n} checkpoint{'' if n == 1 else 's'} (it needs 3 or more)"
    if len(set(accuracy)) < 2:
        return None, "undefined (the accuracy is the same at every checkpoint)"
    if len(set(ranks)) < 2:
        return None, "undefined (the chosen rank is the same at every checkpoint)"
    rho = float(spearmanr(accuracy, ranks).statistic)
    return rho, f"{rho:+.2f}"


def run_demo(
    out_dir: str | Path = "peek-demo",
    config: DemoConfig | None = None,
    *,
    progress: bool | None = None,
    log: Any = print,
) -> DemoResult:
    """Run the whole demo and write stores, sweeps, figures and the report under ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Output folder (created).
    config : DemoConfig, optional
        Sizes; default the full demo (about a minute on 2 CPU cores).
    progress : bool, optional
        Progress bars.
    log : callable
        Receives one line per step.

    Returns
    -------
    DemoResult
    """
    from . import capture, datasets
    from .sweep import rank_sweep

    cfg = config or DemoConfig()
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit repeatable training
    try:
        data = datasets.digits()
        x_all = torch.as_tensor(np.asarray(data.inputs), dtype=torch.float32)
        y_all = torch.as_tensor(np.asarray(data.labels), dtype=torch.int64)
        perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(cfg.seed))
        train, test = perm[: cfg.train_size], perm[cfg.train_size :]
        x_tr, y_tr, x_te, y_te = x_all[train], y_all[train], x_all[test], y_all[test]
        np.save(out / "test_images.npy", x_te.numpy())
        np.save(out / "test_labels.npy", y_te.numpy())
        result = DemoResult(out_dir=str(out))
        sweeps: dict[str, dict[str, Any]] = {}
        for name, epochs, shuffled in cfg.checkpoints:
            torch.manual_seed(cfg.seed)
            model = DigitsCNN()
            labels = y_tr
            if shuffled:
                g = torch.Generator().manual_seed(cfg.seed + 2)
                labels = y_tr[torch.randperm(len(y_tr), generator=g)]
            _train(model, x_tr, labels, epochs, cfg)
            acc = _accuracy(model, x_te, y_te)
            result.accuracy[name] = acc
            log(f"[demo] {name}: {epochs} epochs, test accuracy {acc:.3f}")
            store = capture(
                model,
                (x_te.numpy(), y_te.numpy()),
                layers=list(LAYERS),
                store=out / f"{name}.zarr",
                dtype="float32",
                batch_size=256,
                fold_spatial=True,  # samples x channels x (H*W), as in the paper
                overwrite=True,
                progress=False,
            )
            sweeps[name] = {}
            result.chosen_rank[name] = {}
            for layer in LAYERS:
                sweep = rank_sweep(
                    store[layer],
                    cfg.ranks,
                    cfg.replicates,
                    method=cfg.method,
                    n_iter_max=cfg.n_iter_max,
                    tol=cfg.tol,
                    random_state=cfg.seed,
                    progress=progress,
                )
                sweep.save(out / f"{name}_{layer}_sweep.npz")
                sweeps[name][layer] = sweep
                result.chosen_rank[name][layer] = sweep.chosen_rank
                log(f"[demo]   {layer} {tuple(store[layer].shape)}: rank {sweep.chosen_rank}")
    finally:
        torch.set_num_threads(threads)
    names = [n for n, _, _ in cfg.checkpoints]
    accs = [result.accuracy[n] for n in names]
    parts = []
    rho_texts = {}
    for layer in LAYERS:
        ranks = [result.chosen_rank[n][layer] for n in names]
        rho, rho_texts[layer] = _spearman(accs, ranks)
        result.correlation[layer] = rho
        parts.append(f"{layer}: ranks {ranks} (Spearman rho with accuracy {rho_texts[layer]})")
    result.finding = (
        "Chosen CP rank per layer across checkpoints "
        + ", ".join(f"{n} (accuracy {a:.2f})" for n, a in zip(names, accs, strict=True))
        + ": "
        + "; ".join(parts)
        + "."
    )
    log("[demo] finding: " + result.finding)
    result.report = _write_report(
        out, cfg, result, sweeps, names, x_te.numpy(), y_te.numpy(), rho_texts
    )
    result.seconds = time.perf_counter() - t_start
    summary = json.dumps(result.__dict__, indent=2).encode()
    atomic_write(out / "summary.json", lambda fh: fh.write(summary))
    return result


def _write_report(out, cfg, result, sweeps, names, images, labels, rho_texts) -> str:
    """Figures from the saved result files, then one self-contained HTML report."""
    from . import report
    from .sweep import RankSweep

    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    records = [
        {
            "layer": layer,
            "checkpoint": n,
            "accuracy": result.accuracy[n],
            "rank": result.chosen_rank[n][layer],
        }
        for n in names
        for layer in LAYERS
    ]
    overview = [report.training_quality_figure(records, figs / "training_quality")]
    shown = "well-trained" if "well-trained" in names else names[-1]
    sections = []
    for layer in LAYERS:
        layer_figs = []
        for n in names:
            sweep = RankSweep.load(out / f"{n}_{layer}_sweep.npz")  # from the file, not live
            layer_figs.append(
                report.rank_sweep_figure(sweep, figs / f"{n}_{layer}_sweep", title=f"{layer}, {n}")
            )
        best = sweeps[shown][layer].model()
        model_path = out / f"{shown}_{layer}_model.npz"
        best.save(model_path)
        layer_figs.append(
            report.class_component_figure(model_path, labels, figs / f"{shown}_{layer}_classes")
        )
        side = int(round(math.sqrt(best.shape[2])))  # positions were folded from side x side
        components = [
            report.component_figure(
                model_path,
                images,
                r,
                out_stem=figs / f"{shown}_{layer}_component{r}",
                labels=labels,
                top_k=9,
                spatial_shape=(side, side),
            )
            for r in range(min(best.rank, cfg.components_shown))
        ]
        sections.append(
            report.LayerSection(
                name=layer,
                summary={
                    "shape": best.shape,
                    **{f"chosen rank ({n})": result.chosen_rank[n][layer] for n in names},
                    "Spearman rho (rank vs accuracy)": rho_texts[layer],
                    f"components shown ({shown})": len(components),
                },
                figures=layer_figs,
                components=components,
            )
        )
    path = report.write_report(
        out / "report.html",
        title="peekcore demo: layer rank against training quality (digits CNN)",
        settings={
            "data": "scikit-learn digits (8 x 8), held-out split",
            "checkpoints": [
                {"name": n, "epochs": e, "shuffled_labels": sh} for n, e, sh in cfg.checkpoints
            ],
            "test_accuracy": result.accuracy,
            "ranks": list(cfg.ranks),
            "method": cfg.method,
            "layout": "samples x channels x (H*W), after each ReLU",
            "replicates": cfg.replicates,
            "n_iter_max": cfg.n_iter_max,
            "tol": cfg.tol,
            "seed": cfg.seed,
        },
        layers=sections,
        figures=overview,
        notes=result.finding,
    )
    return str(path)
