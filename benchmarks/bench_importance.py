"""Component importance of a rank-16 model of the digits CNN's last convolutional layer.

The demo's digits CNN is trained as the demo trains it (clean labels, the
demo's longest run), its last convolutional layer (``act3``, after the ReLU,
samples x 32 channels x 16 positions) is captured on the held-out digits and
fitted by nonnegative CP at rank 16. Then, on the same held-out digits:

- one plain forward pass over them (batches of 64, eval mode, no autograd);
- ``component_importance`` of all 16 components, both modes (remove, keep),
  sample rows from the fitted model;
- the same with the rows projected (NNLS per sample), as for new data.

Times are medians of ``--repeats`` runs taken in turn, all in one process,
single-threaded torch on a shared machine.

    python benchmarks/bench_importance.py [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _table import finish

import peekcore
from peekcore.demo import DemoConfig, _train_run

RANK = 16


def _interleaved(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds of each function, run in turn ``repeats`` times (shared-machine noise
    then hits them alike), and each one's last result."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    out = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = DemoConfig()
    data = peekcore.datasets.digits()
    x_all = torch.as_tensor(np.asarray(data.inputs), dtype=torch.float32)
    y_all = torch.as_tensor(np.asarray(data.labels), dtype=torch.int64)
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(cfg.seed))
    train, test = perm[: cfg.train_size], perm[cfg.train_size :]
    epochs = max(cfg.epochs)
    net = _train_run(x_all[train], y_all[train], cfg.seed, [epochs], cfg)[epochs]
    x_te, y_te = x_all[test].numpy(), y_all[test].numpy()

    with tempfile.TemporaryDirectory() as tmp:
        store = peekcore.capture(
            net, (x_te, y_te), "act3", Path(tmp) / "s.zarr", dtype="float32",
            fold_spatial=True, batch_size=args.batch_size, progress=False,
        )  # fmt: skip
        cp = peekcore.ncp_hals(
            store["act3"], RANK, n_iter_max=200, tol=1e-7, random_state=0, progress=False
        )

        def plain():
            with torch.inference_mode():
                for i in range(0, len(x_te), args.batch_size):
                    net(torch.as_tensor(x_te[i : i + args.batch_size]))

        def importance(rows: str):
            return peekcore.component_importance(
                net, "act3", cp, (x_te, y_te), batch_size=args.batch_size, store=store,
                sample_factors=rows,
            )  # fmt: skip

        fns = {
            "plain": plain,
            "model": lambda: importance("model"),
            "project": lambda: importance("project"),
        }
        importance("model")  # warm up: first calls allocate and load
        secs, out = _interleaved(fns, args.repeats)
        t_plain, t_model, t_proj = secs["plain"], secs["model"], secs["project"]
        imp, proj = out["model"], out["project"]

    batches = -(-len(x_te) // args.batch_size)
    drives = [imp.top_classes(r, 1, "remove")[0] for r in range(RANK)]
    res = {
        "n_samples": len(x_te),
        "layer_shape": list(cp.shape),
        "rank": RANK,
        "fit": cp.fit,
        "batch_size": args.batch_size,
        "plain_forward_s": t_plain,
        "importance_model_rows_s": t_model,
        "importance_projected_rows_s": t_proj,
        "forward_passes_per_batch": imp.metadata["forward_passes"] / batches,
        "baseline_accuracy": imp.baseline_accuracy,
        "reconstruction_accuracy": imp.reconstruction_accuracy,
        "reconstruction_agreement": imp.reconstruction_agreement,
        "projected_reconstruction_accuracy": proj.reconstruction_accuracy,
        "largest_accuracy_drop": float(-imp.accuracy_change["remove"].min()),
        "drives_most": drives,
        "torch_threads": torch.get_num_threads(),
    }
    rows = [
        ("held-out digits", f"{len(x_te)}; layer act3 {tuple(cp.shape)}, rank {RANK}"),
        ("fit", f"{cp.fit:.4f}"),
        ("one plain forward pass", f"{t_plain * 1e3:.1f} ms"),
        (
            "importance, model rows",
            f"{t_model * 1e3:.1f} ms = {t_model / t_plain:.1f}x the plain pass "
            f"({res['forward_passes_per_batch']:.0f} stacked pass(es) per batch)",
        ),
        ("importance, projected rows", f"{t_proj * 1e3:.1f} ms = {t_proj / t_plain:.1f}x"),
        (
            "accuracy: network / rank-16 model",
            f"{imp.baseline_accuracy:.4f} / {imp.reconstruction_accuracy:.4f} (agreement "
            f"{imp.reconstruction_agreement:.4f}; projected rows "
            f"{proj.reconstruction_accuracy:.4f})",
        ),
        ("largest accuracy drop (remove)", f"{res['largest_accuracy_drop']:.4f}"),
        ("class each component drives most", " ".join(map(str, drives))),
    ]
    finish(rows, res, args.json)


if __name__ == "__main__":
    main()
