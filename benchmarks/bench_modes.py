"""CPU pass on 4-way layers: trailing modes merged against the last mode alone, in one run.

The native pass contracts a group of trailing resident modes first, as one
matrix product per row of the leading modes. It used to take the last mode
alone (W = 14 for a 14 x 14 feature map); now it merges trailing modes while
the leading ones keep at least ``MIN_LEADING_ROWS`` rows for the threads
(``peekcore.kernels.native.trailing_start``). Both groupings run here on the
same data, float16 storage, the fits compared.

    python benchmarks/bench_modes.py [--iters 5] [--json PATH]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _table import finish, per_iteration

import peekcore
import peekcore.kernels.native as native

SHAPES = [(4096, 256, 14, 14), (2048, 64, 28, 28), (1024, 512, 7, 7), (2000, 256, 196)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows, res = [], {"cases": []}
    merged_rule = native.MIN_LEADING_ROWS
    for shape in SHAPES:
        x = torch.from_numpy(np.abs(rng.standard_normal(shape, dtype=np.float32))).half()
        for rank in args.ranks:
            case = {"shape": shape, "rank": rank}
            for name, min_rows in (("last_mode_alone", 1 << 62), ("merged", merged_rule)):
                native.MIN_LEADING_ROWS = min_rows
                kw = dict(n_iter_max=args.iters, tol=0, random_state=0, progress=False)
                model = peekcore.cp_als(x, rank, **kw)
                case[name] = per_iteration(model)
                case[f"{name}_fit"] = model.fit
            native.MIN_LEADING_ROWS = merged_rule
            k = native.trailing_start(list(shape[1:]), peekcore.build_info()["max_threads"])
            case["grouping"] = f"{shape[1:][:k]} x {shape[1:][k:]}"
            res["cases"].append(case)
            rows.append(
                (
                    f"{shape} R={rank}, {case['grouping']}",
                    f"{case['last_mode_alone'] * 1e3:6.1f} -> {case['merged'] * 1e3:6.1f} ms/iter"
                    f" ({case['last_mode_alone'] / case['merged']:.2f}x, fit difference "
                    f"{abs(case['merged_fit'] - case['last_mode_alone_fit']):.1e})",
                )
            )
    finish(rows, res, args.json)


if __name__ == "__main__":
    main()
