"""The embedded demo: does the rank of a layer's activations say how well the net was trained?

With no download: a small CNN is trained on scikit-learn's bundled handwritten
digits from several seeds, with clean labels and with 50% and 100% of the
training labels shuffled, and saved at several points along training (the
untrained net included). Every checkpoint's three ReLU layers are captured on
held-out digits (samples x channels x positions, nonnegative), each layer's
nonnegative CP rank is swept (ranks 1 to 20, two replicates per rank), five
rank measures are taken per sweep with a bootstrap over samples
(:mod:`peekcore.profile.measures`), and each measure is related to test
accuracy per layer and pooled (Spearman's rho and Kendall's tau, permutation
p-values within training seeds, bootstrap intervals over whole seeds:
:mod:`peekcore.profile.association`). The verdict is stated as measured,
whatever its direction, and says "inconclusive" when that is the truth (Saini
and Papalexakis report that better-trained networks show characteristic ranks;
this asks it again with statistics).

Label noise separates training time from quality: a net trained as long on
shuffled labels has moved as far from its start but generalizes no better
than chance.

Deterministic for a given seed (single-threaded training, seeded everything).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["DemoConfig", "DemoResult", "DigitsCNN", "run_demo", "LAYERS"]

LAYERS = ("act1", "act2", "act3")


@dataclass
class DemoConfig:
    """Sizes of the demo (``small()`` for the test suite).

    Attributes
    ----------
    seed : int
        Seeds the data split and the networks: network ``i`` is trained from
        seed ``seed * n_networks + i``, so two demo seeds share no network.
    n_networks : int
        Training seeds.
    noise : tuple of float
        Shares of training labels shuffled, one training run per network each.
    epochs : tuple of int
        Checkpoints of the clean-label runs (epoch 0: the untrained network,
        shared by every run of one seed).
    noisy_epochs : tuple of int
        Checkpoints of the runs with shuffled labels.
    ranks, replicates, n_iter_max, tol, method
        Of every rank sweep (:func:`peekcore.rank_sweep`).
    n_boot : int
        Bootstrap draws over samples per sweep.
    n_permutations, n_boot_association : int
        Of the association tests.
    """

    seed: int = 0
    n_networks: int = 3
    noise: tuple[float, ...] = (0.0, 0.5, 1.0)
    epochs: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
    noisy_epochs: tuple[int, ...] = (4, 16)
    ranks: tuple[int, ...] = tuple(range(1, 21))
    replicates: int = 2
    n_iter_max: int = 50
    tol: float = 1e-5
    method: str = "ncp"
    n_boot: int = 100
    n_permutations: int = 2000
    n_boot_association: int = 2000
    train_size: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    report_sweeps: bool = True

    @classmethod
    def small(cls, seed: int = 0) -> DemoConfig:
        """A few seconds' version for tests: 2 networks, 6 points per layer, ranks 1-3."""
        return cls(
            seed=seed,
            n_networks=2,
            noise=(0.0, 1.0),
            epochs=(0, 2),
            noisy_epochs=(2,),
            ranks=(1, 2, 3),
            n_iter_max=15,
            n_boot=10,
            n_boot_association=200,
            report_sweeps=False,
        )

    def points_per_layer(self) -> int:
        """(network, checkpoint) points per layer: epoch 0 once per network."""
        clean = [e for e in self.epochs if e > 0] if 0.0 in self.noise else []
        noisy = [e for e in self.noisy_epochs if e > 0]
        per_net = (
            int(0 in self.epochs) + len(clean) + len(noisy) * sum(1 for q in self.noise if q > 0)
        )
        return self.n_networks * per_net


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


def _noisy_labels(y: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """``y`` with a random ``share`` of its entries shuffled among themselves."""
    if share <= 0:
        return y
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(y), generator=g)[: int(round(share * len(y)))]
    out = y.clone()
    out[picked] = y[picked[torch.randperm(len(picked), generator=g)]]
    return out


def _train_run(
    x: torch.Tensor, y: torch.Tensor, seed: int, epochs: list[int], cfg: DemoConfig
) -> dict[int, DigitsCNN]:
    """Train one network from seed ``seed``; copies of it after each epoch in ``epochs``."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    snaps: dict[int, DigitsCNN] = {}

    def snapshot(epoch: int) -> None:
        if epoch in epochs:
            copy = DigitsCNN()
            copy.load_state_dict(model.state_dict())
            snaps[epoch] = copy.eval()

    snapshot(0)
    for epoch in range(1, max(epochs) + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        snapshot(epoch)
    return snaps


@dataclass
class DemoResult:
    """What the demo measured; ``summary.json`` holds :meth:`RankProfile.summary`."""

    out_dir: str
    verdict: str = ""
    verdicts: dict[str, str] = field(default_factory=dict)
    points_per_layer: int = 0
    report: str = ""
    profile: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    seconds_by_step: dict[str, float] = field(default_factory=dict)


def _checkpoints(cfg: DemoConfig, x_tr, y_tr, log) -> list[dict]:
    """Every (network, run, epoch) checkpoint, trained single-threaded (repeatable)."""
    out = []
    for i in range(cfg.n_networks):
        seed = cfg.seed * cfg.n_networks + i
        for share in cfg.noise:
            epochs = list(cfg.epochs if share == 0 else cfg.noisy_epochs)
            if 0 not in epochs and (share == 0 or 0.0 not in cfg.noise):
                epochs.append(0)  # untrained is kept once per network
            labels = _noisy_labels(y_tr, share, seed + 1000)
            snaps = _train_run(x_tr, labels, seed, sorted(set(epochs)), cfg)
            pct = int(round(100 * share))
            for epoch, model in snaps.items():
                if epoch == 0:
                    if any(c["seed"] == seed and c["info"]["epoch"] == 0 for c in out):
                        continue
                    name, cond = f"net{seed}-untrained", "untrained"
                else:
                    name, cond = f"net{seed}-noise{pct}-e{epoch}", f"noise {pct}%, epoch {epoch}"
                info = {"epoch": epoch, "label_noise": 0.0 if epoch == 0 else share}
                out.append(
                    {"name": name, "model": model, "seed": seed, "condition": cond, "info": info}
                )
        log(f"[demo] network seed {seed}: trained ({len(out)} checkpoints so far)")
    return out


def run_demo(
    out_dir: str | Path = "peek-demo",
    config: DemoConfig | None = None,
    *,
    progress: bool | None = False,
    log: Any = print,
) -> DemoResult:
    """Run the whole experiment and write the profile, the report and ``summary.json``.

    Parameters
    ----------
    out_dir : path
        Output folder (created): ``profile.npz``, ``summary.json``,
        ``report.html``, ``figures/``, ``sweeps/`` (two example sweeps per layer).
    config : DemoConfig, optional
        Sizes; default the full experiment (about 4 minutes on 2 idle CPU cores).
    progress : bool, optional
        Progress bars of the sweeps.
    log : callable
        Receives one line per step (the verdict is not among them: it is returned).

    Returns
    -------
    DemoResult
    """
    from . import datasets
    from ._io import atomic_write
    from .profile.profile import accuracy, rank_profile
    from .report._common import json_safe
    from .report.profile_figures import profile_report

    cfg = config or DemoConfig()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = datasets.digits()
    x_all = torch.as_tensor(np.asarray(data.inputs), dtype=torch.float32)
    y_all = torch.as_tensor(np.asarray(data.labels), dtype=torch.int64)
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(cfg.seed))
    train, test = perm[: cfg.train_size], perm[cfg.train_size :]
    x_tr, y_tr, x_te, y_te = x_all[train], y_all[train], x_all[test], y_all[test]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit repeatable training
    try:
        checkpoints = _checkpoints(cfg, x_tr, y_tr, log)
    finally:
        torch.set_num_threads(threads)
    t_trained = time.perf_counter()
    names = [c["name"] for c in checkpoints]
    first = cfg.seed * cfg.n_networks
    shown = [  # example sweeps in the report: untrained, clean and shuffled at their ends
        n
        for n in (
            f"net{first}-untrained",
            f"net{first}-noise0-e{max(cfg.epochs)}",
            f"net{first}-noise{int(round(100 * max(cfg.noise)))}-e{max(cfg.noisy_epochs)}",
        )
        if n in names and cfg.report_sweeps
    ]
    profile = rank_profile(
        checkpoints,
        (x_te.numpy(), y_te.numpy()),
        list(LAYERS),
        ranks=cfg.ranks,
        replicates=cfg.replicates,
        quality=accuracy(x_te, y_te),
        method=cfg.method,
        n_iter_max=cfg.n_iter_max,
        tol=cfg.tol,
        n_boot=cfg.n_boot,
        n_permutations=cfg.n_permutations,
        n_boot_association=cfg.n_boot_association,
        random_state=cfg.seed,
        sweep_dir=out / "sweeps" if shown else None,
        save_sweeps=shown,
        progress=progress,
        log=log,
    )
    t_profiled = time.perf_counter()
    profile.settings["demo"] = {
        "data": "scikit-learn digits (8 x 8): train "
        f"{cfg.train_size}, held out {len(test)} (captured, accuracy)",
        "networks": cfg.n_networks,
        "label_noise": list(cfg.noise),
        "epochs": list(cfg.epochs),
        "noisy_epochs": list(cfg.noisy_epochs),
        "layout": "samples x channels x (H*W), after each ReLU",
        "seed": cfg.seed,
    }
    sweeps = {
        (name, layer): out / "sweeps" / f"{name}_{layer}_sweep.npz"
        for name in shown
        for layer in LAYERS
    }
    importance = _importance_view(checkpoints, x_te.numpy(), y_te.numpy(), cfg, out, log)
    report = profile_report(
        profile,
        out / "report.html",
        title="peekcore demo: does layer rank track training quality? (digits CNN)",
        sweeps=sweeps,
        more_sections=[importance] if importance is not None else [],
    )
    seconds = time.perf_counter() - t_start
    profile.seconds = seconds  # the whole experiment, training and report included
    profile.save(out / "profile.npz")
    text = json.dumps(json_safe(profile.summary()), indent=2, allow_nan=False).encode()
    atomic_write(out / "summary.json", lambda fh: fh.write(text))
    return DemoResult(
        out_dir=str(out),
        verdict=profile.verdict,
        verdicts=dict(profile.verdicts),
        points_per_layer=sum(p["layer"] == LAYERS[0] for p in profile.points),
        report=str(report),
        profile=str(out / "profile.npz"),
        seconds=seconds,
        cpu_seconds=time.process_time() - cpu_start,
        seconds_by_step={
            "training": t_trained - t_start,
            "profile": t_profiled - t_trained,
            "report": time.perf_counter() - t_profiled,
            **{f"profile: {k}": v for k, v in profile.settings["seconds_by_step"].items()},
        },
    )


def _importance_view(checkpoints: list[dict], x_te, y_te, cfg: DemoConfig, out: Path, log) -> Any:
    """What the well-trained network does with each component of its last layer's model.

    The clean-label network of the first seed at its last epoch: its last
    layer captured on the held-out digits, a model of it, and
    :func:`peekcore.component_importance` of every component. The model is
    the example sweep's smallest rank whose reconstruction keeps the
    network's held-out accuracy within ``RECONSTRUCTION_TOLERANCE`` (else its
    largest rank): importance read off a model that does not carry what the
    network uses says little (the sweep's own choice, rank 2 in the full demo,
    leaves the network at chance). Without a sweep: a nonnegative CP fit at
    the largest rank swept. Returns the report section (class purity beside
    importance), or None when no such network was trained.
    """
    from . import capture, ncp_hals
    from .importance import component_importance
    from .report import LayerSection, class_component_figure
    from .report.importance_figures import importance_figure
    from .sweep import RankSweep

    layer, epoch = LAYERS[-1], max(cfg.epochs)
    name = f"net{cfg.seed * cfg.n_networks}-noise0-e{epoch}"
    found = [c["model"] for c in checkpoints if c["name"] == name]
    if not found or epoch == 0:
        return None
    folder = out / "importance"
    store = capture(
        found[0], (x_te, y_te), layer, folder / f"{name}_{layer}.zarr", dtype="float32",
        fold_spatial=True, overwrite=True, progress=False,
    )  # fmt: skip
    swept = out / "sweeps" / f"{name}_{layer}_sweep.npz"
    rule = {}
    if swept.exists():
        sweep = RankSweep.load(swept)
        cp, rule = _faithful_model(found[0], layer, sweep, x_te, y_te, store)
    else:
        kw = dict(n_iter_max=cfg.n_iter_max, tol=cfg.tol, random_state=cfg.seed, progress=False)
        cp = ncp_hals(store[layer], max(cfg.ranks), **kw)
    cp.save(folder / f"{name}_{layer}_model.npz")
    imp = component_importance(found[0], layer, folder / f"{name}_{layer}_model.npz", (x_te, y_te),
                               store=store)  # fmt: skip
    imp.save(folder / f"{name}_{layer}_importance.npz")
    log(
        f"[demo] importance of {name}'s {layer} components: accuracy {imp.baseline_accuracy:.3f}, "
        f"{imp.reconstruction_accuracy:.3f} with the rank-{cp.rank} model"
    )
    figs = out / "report_figures"
    return LayerSection(
        name=f"{layer} of {name}: what each component drives",
        summary={"rank": cp.rank, **rule, "fit": cp.fit, **imp.summary()},
        figures=[
            class_component_figure(cp, y_te, figs / f"importance_{layer}_classes"),
            importance_figure(imp, figs / f"importance_{layer}"),
        ],
    )


#: How far below the network's own held-out accuracy the importance view's
#: reconstruction may fall (the rank rule of :func:`_importance_view`).
RECONSTRUCTION_TOLERANCE = 0.05


def _faithful_model(model, layer: str, sweep: Any, x_te, y_te, store) -> tuple[Any, dict]:
    """The sweep's smallest rank whose reconstruction keeps accuracy within the tolerance.

    Each rank's best model replaces ``layer`` by all its components (one
    forward pass of the held-out data per rank); returns that model and the
    rule's record for the report (the network's accuracy, the rank the sweep
    chose and its reconstruction accuracy). The largest rank when none keeps it.
    """
    from .edits import edited_outputs
    from .profile.checkpoints import accuracy

    y = np.asarray(y_te)
    base = accuracy(x_te, y)(model)
    acc: dict[int, float] = {}

    def reconstruction_accuracy(r: int) -> float:
        if r not in acc:
            cp = sweep.model(r)
            logits = edited_outputs(model, layer, cp, x_te, keep=list(range(r)), store=store)
            acc[r] = float((logits.argmax(1) == y).mean())
        return acc[r]

    ranks = sorted(sweep.ranks)
    rank = next(
        (r for r in ranks if reconstruction_accuracy(r) >= base - RECONSTRUCTION_TOLERANCE),
        ranks[-1],
    )
    rule = {
        "rank rule": f"smallest swept rank whose reconstruction keeps accuracy within "
        f"{RECONSTRUCTION_TOLERANCE} of the network's {base:.3f}",
        "sweep's chosen rank": sweep.chosen_rank,
        "its reconstruction accuracy": reconstruction_accuracy(sweep.chosen_rank),
    }
    return sweep.model(rank), rule
