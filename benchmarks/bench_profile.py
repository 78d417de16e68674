"""The demo experiment's sweep settings against exact sweeps, and what each step costs.

On the demo's own data (digits CNN, held-out split of ``--seed``), for the
first network's untrained, clean (last epoch) and 100%-shuffled (last epoch)
checkpoints and all three layers, the demo's sweeps (``DemoConfig``:
nonnegative CP, ranks 1-20, 2 replicates, 50 iterations, tol 1e-5) are run
beside exact ones (``--exact-iters`` iterations, tol 1e-8), and the rank
measures of both are compared, with the largest fit difference of any rank's
best replicate. The bootstrap over samples is timed per sweep.

    python benchmarks/bench_profile.py [--seed 0] [--exact-iters 300]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from peekcore import capture, datasets
from peekcore.demo import DemoConfig, _noisy_labels, _train_run
from peekcore.profile.measures import MEASURES, bootstrap_measures, measure_sweep
from peekcore.sweep import rank_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact-iters", type=int, default=300)
    parser.add_argument("--store", default="/tmp/bench_profile")
    args = parser.parse_args()
    cfg = DemoConfig(seed=args.seed)
    d = datasets.digits()
    x = torch.as_tensor(d.inputs)
    y = torch.as_tensor(d.labels)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    tr, te = perm[: cfg.train_size], perm[cfg.train_size :]
    seed = cfg.seed * cfg.n_networks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # training as the demo trains
    t = time.perf_counter()
    clean = _train_run(x[tr], y[tr], seed, [0, max(cfg.epochs)], cfg)
    shuffled = _train_run(
        x[tr], _noisy_labels(y[tr], 1.0, seed + 1000), seed, [max(cfg.noisy_epochs)], cfg
    )
    print(f"training 2 runs: {time.perf_counter() - t:.1f} s")
    torch.set_num_threads(threads)  # sweeps: OMP_NUM_THREADS, as set by the caller
    models = {
        "untrained": clean[0],
        "clean": clean[max(cfg.epochs)],
        "shuffled": shuffled[max(cfg.noisy_epochs)],
    }
    labels = y[te].numpy()
    rows = []
    for name, model in models.items():
        st = capture(
            model,
            (x[te].numpy(), labels),
            ["act1", "act2", "act3"],
            f"{args.store}/{name}.zarr",
            dtype="float32",
            fold_spatial=True,
            batch_size=256,
            overwrite=True,
            progress=False,
        )
        for layer in ("act1", "act2", "act3"):
            out = {}
            for kind, iters, tol in (
                ("demo", cfg.n_iter_max, cfg.tol),
                ("exact", args.exact_iters, 1e-8),
            ):
                t = time.perf_counter()
                sw = rank_sweep(
                    st[layer],
                    cfg.ranks,
                    cfg.replicates,
                    method="ncp",
                    n_iter_max=iters,
                    tol=tol,
                    random_state=cfg.seed,
                    progress=False,
                )
                secs = time.perf_counter() - t
                out[kind] = (sw, measure_sweep(sw, labels=labels), secs)
            t = time.perf_counter()
            bootstrap_measures(out["demo"][0], st[layer], labels=labels, n_boot=cfg.n_boot)
            boot = time.perf_counter() - t
            k = np.arange(len(cfg.ranks))
            fits = [np.asarray(out[s][0].fit)[k, out[s][0].best] for s in ("demo", "exact")]
            row = {
                "point": f"{name}/{layer}",
                "demo_s": out["demo"][2],
                "exact_s": out["exact"][2],
                "boot_s": boot,
                "max_fit_gap": float(np.max(np.abs(fits[0] - fits[1]))),
            }
            for m in MEASURES:
                row[m] = (out["demo"][1][m], out["exact"][1][m])
            rows.append(row)
            print(_line(row), flush=True)
    same = {
        m: sum(r[m][0] == r[m][1] or (math.isnan(r[m][0]) and math.isnan(r[m][1])) for r in rows)
        for m in MEASURES
        if m != "ev_area"
    }
    gap = max(abs(r["ev_area"][0] - r["ev_area"][1]) for r in rows)
    print(f"identical measures (of {len(rows)}): {same}; largest ev_area gap {gap:.4f}")
    print(
        "seconds per sweep: demo {:.2f}, exact {:.2f}, bootstrap {:.2f} (means)".format(
            *(np.mean([r[k] for r in rows]) for k in ("demo_s", "exact_s", "boot_s"))
        )
    )


def _line(row: dict) -> str:
    ms = " ".join(f"{m}={_f(row[m][0])}/{_f(row[m][1])}" for m in MEASURES)
    return (
        f"{row['point']:<16} demo {row['demo_s']:5.2f}s exact {row['exact_s']:5.2f}s "
        f"boot {row['boot_s']:5.2f}s fit gap {row['max_fit_gap']:.4f}  {ms} (demo/exact)"
    )


def _f(v: float) -> str:
    return "nan" if math.isnan(v) else (f"{v:.0f}" if v == round(v) else f"{v:.3f}")


if __name__ == "__main__":
    main()
