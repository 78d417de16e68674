"""The ``peek`` command line (also ``python -m peekcore``).

    peek demo      the embedded demo: digits CNN, rank per layer vs accuracy, report
    peek profile   rank measures of layers across checkpoints, and their link with quality
    peek capture   run a model over data and store layer activations (zarr)
    peek fit       fit CP / nonnegative CP to an .npy file or a stored layer
    peek sweep     rank sweep with diagnostics and an automatic rank choice
    peek importance  what the network does with each component of a fitted layer model
    peek report    figures and a self-contained HTML report from result files
    peek info      what a store, model, sweep or checkpoint file holds
    peek bench     a quick side-by-side timing against TensorLy

Every command prints a short summary (``--json`` for machine-readable output),
reports errors in one line (``--debug`` for the traceback) and exits non-zero
when it fails. ``peek fit`` and ``peek sweep`` run data-parallel under
``torchrun --nproc-per-node N`` (``--distributed``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import check_output_file, parse_ranks
from .errors import FileFormatError, InvalidArgumentError, MissingInputError, UnknownNameError

__all__ = ["main", "parse_ranks", "section_names"]


def _open_data(path: str, layer: str | None):
    """An .npy file, or a layer of an activation store."""
    p = Path(path)
    if not p.exists():
        raise MissingInputError(f"no such file or store: {p}")
    if p.is_dir():
        from .store import ActivationStore

        store = ActivationStore(p)
        if layer is None:
            if len(store.layers) != 1:
                raise InvalidArgumentError(
                    f"the store {p} holds layers {list(store.layers)}: choose one with --layer"
                )
            layer = store.layers[0]
        if layer not in store:
            import difflib

            close = difflib.get_close_matches(layer, store.layers, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownNameError(f"no layer {layer!r} in {p} (it has {list(store.layers)}){hint}")
        return store[layer]
    if layer is not None:
        raise InvalidArgumentError(f"--layer applies to activation stores (folders), not to {p}")
    return str(p)


# ------------------------------------------------------------------- commands


def _demo(args: argparse.Namespace) -> dict:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig.small(args.seed) if args.small else DemoConfig(seed=args.seed)
    log = (lambda line: print(line, file=sys.stderr)) if not args.json else (lambda line: None)
    check_output_file(Path(args.out) / "summary.json", "the demo's outputs", make_folder=True)
    result = run_demo(args.out, cfg, progress=False, log=log)
    return {  # the verdict once; the per-layer sentences are in the report and profile
        "verdict": result.verdict,
        "points_per_layer": result.points_per_layer,
        "report": result.report,
        "summary": str(Path(result.out_dir) / "summary.json"),
        "profile": result.profile,
        "seconds": result.seconds,
        "cpu_seconds": result.cpu_seconds,  # CPU time of all its threads (what contention hides)
        "seconds_by_step": result.seconds_by_step,
    }


def _profile_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(inputs, labels)`` of ``peek profile --data`` (labels None when unknown)."""
    from .errors import InvalidArgumentError
    from .loading import load_inputs

    data, _ = load_inputs(args.data)
    labels = np.load(args.labels, allow_pickle=False) if args.labels else None
    if isinstance(data, str):  # an .npy file of inputs
        inputs = np.load(data, allow_pickle=False)
    elif hasattr(data, "inputs"):
        inputs = data.inputs
        labels = data.labels if labels is None else labels
    else:
        raise InvalidArgumentError(
            "peek profile needs --data as 'digits' or an .npy file of inputs (with --labels "
            "an .npy file of class labels)"
        )
    return inputs, labels


def _profile(args: argparse.Namespace) -> dict:
    from .errors import InvalidArgumentError
    from .loading import import_object
    from .profile.profile import accuracy, rank_profile

    check_output_file(args.out, "the rank profile (--out)")  # before the captures and fits
    builder = import_object(args.model)
    inputs, labels = _profile_data(args)
    if args.quality:
        quality = [float(q) for q in args.quality]
    elif labels is not None:
        quality = accuracy(inputs, labels)
    else:
        raise InvalidArgumentError(
            "no quality for the checkpoints: give --quality with one value per checkpoint, or "
            "labelled data (--data digits, or --labels labels.npy) to compute the accuracy"
        )
    paths = [Path(p) for p in args.checkpoints]
    for p in paths:
        if not p.is_file():
            raise MissingInputError(f"no such checkpoint file: {p}")
    names = section_names(paths)
    log = (lambda line: print(line, file=sys.stderr)) if not args.json else None
    profile = rank_profile(
        list(zip(names, paths, strict=True)),
        inputs if labels is None else (inputs, labels),
        [s.strip() for s in args.layers.split(",") if s.strip()],
        ranks=parse_ranks(args.ranks),
        replicates=args.replicates,
        quality=quality,
        quality_name="accuracy" if not args.quality else "quality",
        method=args.method,
        store=args.store,
        builder=builder,
        trust=args.trust_model_file,
        n_boot=args.n_boot,
        log=log,
        **_fit_settings(args),
    )
    profile.save(args.out)
    return {
        "verdict": profile.verdict,
        "points": len(profile.points),
        "out": args.out,
        "seconds": profile.seconds,
    }


def _is_profile(path: str) -> bool:
    from ._io import open_npz, read_header

    try:
        with open_npz(path, "a rank profile") as data:
            return read_header(data, path, "a rank profile").get("format") == "peekcore.RankProfile"
    except (OSError, ValueError):
        return False


def _profile_report(args: argparse.Namespace) -> dict:
    from .report.profile_figures import profile_report

    title = None if args.title == "peekcore report" else args.title
    path = profile_report(args.results[0], args.out, title=title)
    return {"report": str(path)}


def _capture(args: argparse.Namespace) -> dict:
    from ._validate import check_device
    from .capture import capture
    from .loading import load_inputs, load_model

    if args.device is not None:
        check_device(args.device)
    model = load_model(args.model, trust=args.trust_model_file, weights=args.weights)
    data, notes = load_inputs(args.data, model)
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    t0 = time.perf_counter()
    store = capture(
        model,
        data,
        layers,
        args.store,
        dtype=args.dtype,
        batch_size=args.batch_size,
        device=args.device,
        fold_spatial=args.fold_spatial,
        overwrite=args.overwrite,
        progress=_progress(args),
    )
    return {
        "store": str(store.path),
        "layers": {name: list(store[name].shape) for name in store.layers},
        "dtype": store.dtype,
        "seconds": time.perf_counter() - t0,
        "notes": notes,
    }


def _fit_settings(args: argparse.Namespace) -> dict:
    """``--iters``, ``--tol`` and ``--seed`` under the library's names (fit, sweep, profile)."""
    return dict(n_iter_max=args.iters, tol=args.tol, random_state=args.seed)


def _solver_kwargs(args: argparse.Namespace) -> dict:
    """The solver keywords of ``peek fit`` and ``peek sweep`` (:func:`_solver_options`)."""
    return dict(
        **_fit_settings(args),
        device=args.device,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        progress=_progress(args),
        distributed=True if args.distributed else None,
    )


def _rank0() -> bool:
    import torch

    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _progress(args: argparse.Namespace) -> bool | None:
    """Bars when asked (``--progress``); none under ``--json``; else only on a terminal."""
    if getattr(args, "progress", False):
        return True
    return False if args.json else None


def _unconverged_notes(models: list, args: argparse.Namespace) -> list[str]:
    """A line saying how many fits stopped at ``--iters`` before meeting ``--tol``."""
    stopped = [m for m in models if m.history.stop_reason == "n_iter_max"]
    if not stopped:
        return []
    which = "the fit" if len(models) == 1 else f"{len(stopped)} of {len(models)} fits"
    return [
        f"not converged: {which} stopped at --iters {args.iters} with the fit still changing "
        f"by more than --tol {args.tol:g} per iteration; raise --iters (or loosen --tol) "
        "and run again"
    ]


def _fit(args: argparse.Namespace) -> dict:
    import peekcore

    if args.out:  # before the fit, which a bad path would otherwise throw away
        check_output_file(args.out, "the model (--out)")
    data = _open_data(args.data, args.layer)
    fit = peekcore.cp_als if args.method == "cp" else peekcore.ncp_hals
    kw = _solver_kwargs(args)
    model = fit(
        data, args.rank, init=args.init, checkpoint=args.checkpoint, resume=args.resume, **kw
    )
    if args.out and _rank0():
        model.save(args.out)
    return {
        "rank": model.rank,
        "shape": list(model.shape),
        "fit": model.fit,
        "iterations": model.history.n_iter,
        "converged": model.history.converged,
        "stop_reason": model.history.stop_reason,
        "seconds_per_iteration": float(np.median(model.history.seconds)),
        "weights": model.weights.tolist(),
        "source": model.metadata.get("source"),
        "out": args.out,
        "notes": _unconverged_notes([model], args),
    }


def _sweep(args: argparse.Namespace) -> dict:
    from .sweep import rank_sweep

    if args.out:  # before the sweep, which a bad path would otherwise throw away
        check_output_file(args.out, "the sweep (--out)")
    ranks = parse_ranks(args.ranks)
    data = _open_data(args.data, args.layer)
    kw = _solver_kwargs(args)
    sweep = rank_sweep(
        data,
        ranks,
        args.replicates,
        method=args.method,
        compress=args.compress,
        **kw,
    )
    if args.out and _rank0():
        sweep.save(args.out)
    return {
        "chosen_rank": sweep.chosen_rank,
        "reason": sweep.choice_reason,
        "table": sweep.table(),
        "compression": sweep.compression,
        "seconds": sweep.seconds,
        "source": sweep.metadata.get("source"),
        "out": args.out,
        "notes": _unconverged_notes([m for row in sweep.models for m in row], args),
    }


def _importance(args: argparse.Namespace) -> dict:
    from .importance import component_importance
    from .loading import load_inputs, load_model
    from .store import ActivationStore

    if args.out:  # before the forward passes
        check_output_file(args.out, "the importance result (--out)")
    model = load_model(args.model, trust=args.trust_model_file, weights=args.weights)
    store = ActivationStore(args.store)
    data, notes = load_inputs(args.data, model)
    labels = np.load(args.labels, allow_pickle=False) if args.labels else None
    imp = component_importance(
        model,
        args.layer,
        args.result,
        data,
        labels=labels,
        batch_size=args.batch_size,
        device=args.device,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
        store=store,
        sample_factors=args.sample_factors,
    )
    if args.out:
        imp.save(args.out)
    summary = {**imp.summary(), "table": imp.table(), "metadata": imp.metadata, "out": args.out}
    return {**summary, "notes": notes} if notes else summary


def _report(args: argparse.Namespace) -> dict:
    if len(args.results) == 1 and _is_profile(args.results[0]):
        return _profile_report(args)
    from .report.assemble import build_report

    out = check_output_file(args.out, "the report (--out)", make_folder=True)
    figs = out.parent / (out.stem + "_figures")
    check_output_file(figs / "figure.png", f"figures (in {figs})", make_folder=True)
    built = build_report(
        args.results,
        args.out,
        images=args.images,
        labels=args.labels,
        components=args.components,
        spatial_shape=_spatial(args.spatial),
        title=args.title,
        settings=_report_settings(args),
    )
    return {"report": str(built.path), "sections": built.sections}


def _report_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The report's settings table: what the user gave, under the flags' names."""
    settings: dict[str, Any] = {"result files": list(args.results)}
    for flag, value in (
        ("--images", args.images),
        ("--labels", args.labels),
        ("--spatial", args.spatial),
    ):
        if value is not None:
            settings[flag] = value
    settings["--components"] = args.components
    return settings


def section_names(paths: list[Path]) -> list[str]:
    """One distinct section name per file (see :func:`peekcore.report.assemble.section_names`)."""
    from .report.assemble import section_names as names

    return names(paths)


def _spatial(text: str | None) -> tuple[int, int] | None:
    """``--spatial HxW`` as ``(H, W)``."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise InvalidArgumentError(f"--spatial {text!r}: give the spatial shape as HxW, e.g. 7x7")
    return int(m.group(1)), int(m.group(2))


#: What ``peek info`` reads, for its errors.
_INFO_ACCEPTS = (
    "an activation store folder, or a model, sweep or checkpoint file (.npz) written by "
    "peekcore (CPModel.save, RankSweep.save, peek fit --checkpoint)"
)


def _info(args: argparse.Namespace) -> dict:
    import peekcore

    if args.path is None:
        return peekcore.build_info()
    p = Path(args.path)
    if not p.exists():
        raise MissingInputError(f"no such file or store: {p}")
    if p.is_dir():
        from .store import ActivationStore

        store = ActivationStore(p)
        return {
            "kind": "activation store",
            "path": str(p),
            "layers": {
                n: {"shape": list(store[n].shape), "dims": list(store[n].dims)}
                for n in store.layers
            },
            "n_samples": store.n_samples,
            "dtype": store.dtype,
            "labels": store.labels is not None,
            "provenance": store.provenance,
        }
    from ._io import open_npz, read_header

    with open_npz(p, _INFO_ACCEPTS) as data:
        header = read_header(data, p, _INFO_ACCEPTS)
    kind = header.get("format", "unknown")
    if kind == "peekcore.CPModel":
        m = peekcore.CPModel.load(p)
        return {
            "kind": "CP model",
            "source": m.metadata.get("source"),
            "shape": list(m.shape),
            "rank": m.rank,
            "fit": m.fit,
            "iterations": m.history.n_iter,
            "metadata": m.metadata,
        }
    if kind == "peekcore.RankSweep":
        from .sweep import RankSweep

        s = RankSweep.load(p)
        return {
            "kind": "rank sweep",
            "source": s.metadata.get("source"),
            "ranks": s.ranks,
            "replicates": s.replicates,
            "chosen_rank": s.chosen_rank,
            "reason": s.choice_reason,
            "table": s.table(),
        }
    if kind == "peekcore.checkpoint":
        return {"kind": "checkpoint", "iteration": header["iteration"], "key": header["key"]}
    if kind == "peekcore.ComponentImportance":
        from .importance import ComponentImportance

        imp = ComponentImportance.load(p)
        return {"kind": "component importance", **imp.summary(), "table": imp.table()}
    if kind == "peekcore.RankProfile":
        from .profile.profile import RankProfile

        prof = RankProfile.load(p)
        return {
            "kind": "rank profile",
            "layers": prof.layers,
            "ranks": f"{prof.ranks[0]}-{prof.ranks[-1]}",
            "points": len(prof.points),
            "verdict": prof.verdict,
        }
    raise FileFormatError(f"{p}: unknown peekcore file format {kind!r}")


def _bench(args: argparse.Namespace) -> dict:
    import peekcore
    from peekcore.model import CPModel

    rng = np.random.default_rng(0)
    shape = (args.samples, args.channels, args.space)
    x = rng.standard_normal(shape, dtype=np.float32)
    np.abs(x, out=x)
    init = CPModel(np.ones(args.rank), [rng.random((n, args.rank)) for n in shape])
    kw = dict(n_iter_max=args.iters, tol=0, init=init, progress=False)
    out: dict[str, Any] = {"shape": list(shape), "rank": args.rank}
    for name, fn in (("cp_als", peekcore.cp_als), ("ncp_hals", peekcore.ncp_hals)):
        m = fn(x, args.rank, **kw)
        out[f"peekcore_{name}_s_per_iter"] = float(np.median(m.history.seconds[1:]))
    try:
        import tensorly as tl
        from tensorly.decomposition import parafac

        tl.set_backend("numpy")
        t0 = time.perf_counter()
        parafac(x, args.rank, n_iter_max=args.iters, init=init.to_tensorly(), tol=0)
        out["tensorly_numpy_cp_s_per_iter"] = (time.perf_counter() - t0) / args.iters
        out["speedup"] = out["tensorly_numpy_cp_s_per_iter"] / out["peekcore_cp_als_s_per_iter"]
    except ImportError:
        out["tensorly"] = "not installed"
    return out


# ------------------------------------------------------------------- parser


def _solver_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", help="layer of an activation store (when DATA is a store folder)")
    p.add_argument(
        "--method",
        choices=("cp", "ncp"),
        default="cp",
        help="cp: CP-ALS; ncp: nonnegative CP by HALS (default cp)",
    )
    p.add_argument("--iters", type=int, default=100, help="maximum iterations (default 100)")
    p.add_argument("--tol", type=float, default=1e-8, help="stopping tolerance on fit change")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--dtype", default=None, help="accumulation dtype: float32 or float64")
    p.add_argument("--chunk-size", type=int, default=None, help="samples per chunk")
    p.add_argument(
        "--distributed", action="store_true", help="data-parallel over torchrun's processes"
    )


def _profile_parser(sub: Any) -> None:
    """``peek profile``: rank measures across checkpoints."""
    prof = sub.add_parser(
        "profile", help="rank measures of layers across checkpoints, against their quality"
    )
    prof.add_argument(
        "--model", required=True, help="module:attribute or file.py:attribute building the model"
    )
    prof.add_argument(
        "--checkpoints", nargs="+", required=True, help="state-dict files (torch.save), 2 or more"
    )
    prof.add_argument(
        "--data", required=True, help="'digits' or an .npy file of inputs (held-out data)"
    )
    prof.add_argument("--labels", help="an .npy file of class labels for --data")
    prof.add_argument("--layers", required=True, help="comma-separated layer names")
    prof.add_argument(
        "--quality", nargs="+", help="one value per checkpoint (default: accuracy on --data)"
    )
    prof.add_argument("--ranks", default="1-20", help="ranks swept (default 1-20)")
    prof.add_argument("--replicates", type=int, default=2, help="restarts per rank (default 2)")
    prof.add_argument("--method", choices=("cp", "ncp"), default="ncp", help="default ncp")
    prof.add_argument("--iters", type=int, default=50, help="iterations per model (default 50)")
    prof.add_argument("--tol", type=float, default=1e-5, help="stopping tolerance (default 1e-5)")
    prof.add_argument("--n-boot", type=int, default=200, help="bootstrap draws (default 200)")
    prof.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    prof.add_argument("--store", help="folder for the activation stores (reused when present)")
    prof.add_argument(
        "--trust-model-file",
        action="store_true",
        help="load whole pickled model files; unpickling can run any code the file carries, "
        "so only for files you trust (state dicts never need it)",
    )
    prof.add_argument("--out", default="profile.npz", help="the profile (default profile.npz)")
    prof.set_defaults(func=_profile)


def _capture_parser(sub: Any) -> None:
    """``peek capture``: a model, its data and layers, the store."""
    cap = sub.add_parser("capture", help="store layer activations of a model over data")
    cap.add_argument(
        "--model",
        required=True,
        help="module:attribute or path/to/file.py:attribute (an nn.Module, its class or a "
        "factory; the current folder is importable) or a torch.save'd .pt/.pth file",
    )
    cap.add_argument(
        "--weights", help="a state-dict file (torch.save(model.state_dict())) loaded into --model"
    )
    cap.add_argument(
        "--trust-model-file",
        action="store_true",
        help="load a whole pickled model file; unpickling can run any code the file carries, "
        "so only for files you trust (state dicts never need it)",
    )
    cap.add_argument("--data", required=True, help="'digits', an .npy file or an image folder")
    cap.add_argument("--layers", required=True, help="comma-separated layer names")
    cap.add_argument("--store", required=True, help="output store folder (zarr)")
    cap.add_argument("--dtype", default="float16", help="float16, bfloat16 or float32")
    cap.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    cap.add_argument("--device", default=None, help="device of the model (default its own)")
    cap.add_argument("--fold-spatial", action="store_true", help="store N x C x (H*W)")
    cap.add_argument("--overwrite", action="store_true", help="replace an existing store")
    cap.set_defaults(func=_capture)


def _importance_parser(sub: Any) -> None:
    """``peek importance``: what the network does with each component."""
    imp = sub.add_parser(
        "importance", help="causal importance of a fitted model's components for the outputs"
    )
    imp.add_argument("--model", required=True, help="the network, as for peek capture --model")
    imp.add_argument("--weights", help="a state-dict file loaded into --model")
    imp.add_argument(
        "--trust-model-file",
        action="store_true",
        help="allow a pickled --model file (it can run code: only for files you trust)",
    )
    imp.add_argument("--store", required=True, help="the store the model was fitted from")
    imp.add_argument("--layer", required=True, help="the layer the model was fitted to")
    imp.add_argument("--result", required=True, help="the fitted model or sweep (.npz)")
    imp.add_argument(
        "--data", required=True, help="network inputs: 'digits', an .npy file or an image folder"
    )
    imp.add_argument("--labels", help="labels (.npy, N) when the data has none")
    imp.add_argument("--modes", default="remove,keep", help="remove, keep or both (default)")
    imp.add_argument(
        "--sample-factors",
        choices=("auto", "model", "project"),
        default="auto",
        help="sample rows from the model (its own data) or by projection (default auto)",
    )
    imp.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    imp.add_argument("--device", default=None, help="device of the model (default its own)")
    imp.add_argument("--out", help="save the result here (.npz)")
    imp.set_defaults(func=_importance)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="peek",
        description="peekcore: look inside neural networks through tensor factorization.",
    )
    _global_options(parser, default=False)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

    demo = sub.add_parser(
        "demo", help="the embedded experiment: digits CNNs along training, rank vs accuracy"
    )
    demo.add_argument("--out", default="peek-demo", help="output folder (default peek-demo)")
    demo.add_argument("--small", action="store_true", help="a fast, smaller configuration")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)

    _profile_parser(sub)

    _capture_parser(sub)

    fit = sub.add_parser("fit", help="fit CP or nonnegative CP")
    fit.add_argument("data", help="an .npy file or an activation store folder")
    fit.add_argument("--rank", type=int, required=True, help="number of components")
    fit.add_argument("--init", default="random", choices=("random", "gram"), help="initialization")
    fit.add_argument("--checkpoint", help="write a checkpoint here every iteration")
    fit.add_argument("--resume", help="continue from this checkpoint")
    fit.add_argument("--out", help="save the model here (.npz)")
    _solver_options(fit)
    fit.set_defaults(func=_fit)

    sw = sub.add_parser("sweep", help="rank sweep with diagnostics and a rank choice")
    sw.add_argument("data", help="an .npy file or an activation store folder")
    sw.add_argument("--ranks", default="1-8", help="e.g. 1-8, 2,4,8 or 1-16:2 (default 1-8)")
    sw.add_argument("--replicates", type=int, default=3, help="restarts per rank (default 3)")
    sw.add_argument("--compress", action="store_true", help="compressed sweep (cp only)")
    sw.add_argument("--out", help="save the sweep here (.npz)")
    _solver_options(sw)
    sw.set_defaults(func=_sweep)

    _importance_parser(sub)

    rep = sub.add_parser("report", help="figures and an HTML report from result files")
    rep.add_argument("results", nargs="+", help="model, sweep or component-importance files (.npz)")
    rep.add_argument("--out", default="report.html", help="the HTML file (default report.html)")
    rep.add_argument("--images", help="input images (.npy, N x H x W or N x C x H x W)")
    rep.add_argument("--labels", help="labels (.npy, N)")
    rep.add_argument("--components", type=int, default=4, help="components shown per result")
    rep.add_argument("--spatial", help="spatial shape HxW of a folded 3-way model")
    rep.add_argument("--title", default="peekcore report", help="report title")
    rep.set_defaults(func=_report)

    info = sub.add_parser("info", help="what a store or result file holds (none: the build)")
    info.add_argument("path", nargs="?", help="store folder, model/sweep/checkpoint file")
    info.set_defaults(func=_info)

    bench = sub.add_parser("bench", help="quick timing against TensorLy")
    bench.add_argument("--samples", type=int, default=500, help="samples (default 500)")
    bench.add_argument("--channels", type=int, default=128, help="channels (default 128)")
    bench.add_argument("--space", type=int, default=196, help="spatial positions (default 196)")
    bench.add_argument("--rank", type=int, default=16, help="rank (default 16)")
    bench.add_argument("--iters", type=int, default=5, help="iterations timed (default 5)")
    bench.set_defaults(func=_bench)
    return parser


class _UsageError(Exception):
    """A command line argparse refused (printed as usage, or as JSON under ``--json``)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D102 - argparse's hook; raise instead of exiting
        raise _UsageError(f"{message} (see {self.prog} --help)")


class _CommandParser(_Parser):
    """A subcommand's parser: it also takes ``--json`` and ``--debug``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _global_options(self, default=argparse.SUPPRESS)


def _global_options(p: argparse.ArgumentParser, default: Any) -> None:
    """``--json`` and ``--debug``, accepted before and after the subcommand.

    The subcommands get them with a suppressed default, so an option given
    before the subcommand is not reset by the subcommand's parser.
    """
    p.add_argument(
        "--json", action="store_true", default=default, help="print one JSON document on stdout"
    )
    p.add_argument(
        "--debug", action="store_true", default=default, help="show full tracebacks on errors"
    )
    p.add_argument(
        "--progress",
        action="store_true",
        default=default,
        help="progress bars even when stderr is not a terminal (default: on a terminal "
        "only, or as PEEKCORE_PROGRESS=0/1 says)",
    )


def _is_rank0() -> bool:
    """Whether this process prints: not under torchrun, or its rank 0."""
    return os.environ.get("RANK", "0") == "0"


#: Settings that are numbers, by their Python name, and the flags that set them.
_SETTING_FLAGS = {"chunk_size": "--chunk-size", "n_iter_max": "--iters", "random_state": "--seed"}

#: Python argument names in library messages, and the flags a command-line user types.
_FLAG_NAMES = (
    (re.compile(r"\boverwrite=True\b"), "--overwrite"),
    (re.compile(r"\bresume=(?=[\s,;:.)]|$)"), "--resume"),
    (re.compile(r"\bcheckpoint=(?=[\s,;:.)]|$)"), "--checkpoint"),
    (re.compile(r"\bfold_spatial=True\b"), "--fold-spatial"),
    *(
        (re.compile(pattern.format(name)), flag + space)
        for name, flag in _SETTING_FLAGS.items()
        for pattern, space in (
            (r"\b{}=(?=[\s,;:.)]|$)", ""),  # "pass n_iter_max="
            (r"\b{}(?= must\b)", ""),  # a check's own words: "n_iter_max must be ..."
            (r"\b{}=(?=\d)", " "),  # and its example: "e.g. random_state=0"
        )
    ),
)


def _error_message(err: BaseException) -> str:
    """The error's message, with Python argument names replaced by the flags users type."""
    msg = str(err).strip("'\"") if isinstance(err, KeyError) else str(err)
    for pattern, flag in _FLAG_NAMES:
        msg = pattern.sub(flag, msg)
    return msg


def main(argv: list[str] | None = None) -> int:
    """Run the ``peek`` command line; returns the exit code (0 on success, 1 on errors).

    With ``--json`` (anywhere on the line) stdout holds exactly one JSON
    document: the result, or ``{"error": message, "kind": error class}``.
    """
    from .textout import dumps_json, format_human

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    want_json = "--json" in argv
    command = "peek"
    try:
        args = parser.parse_args(argv)
        command = f"peek {args.command}"
        result = args.func(args)
    except _UsageError as err:
        return _report_error(command, err, want_json, debug=False, kind="UsageError")
    except SystemExit:  # --help and --version print and leave through argparse
        raise
    except Exception as err:  # one clear line; the traceback with --debug
        return _report_error(command, err, want_json, debug="--debug" in argv)
    if _is_rank0():
        print(dumps_json(result) if args.json else format_human(result))
    return 0


def _report_error(
    command: str, err: BaseException, want_json: bool, *, debug: bool, kind: str | None = None
) -> int:
    from .textout import dumps_json

    if debug:
        traceback.print_exc()
    msg = _error_message(err)
    rank = os.environ.get("RANK")
    prefix = f"{command} (rank {rank})" if rank not in (None, "0") else command
    print(f"{prefix}: error: {msg}", file=sys.stderr)
    if want_json and _is_rank0():
        print(dumps_json({"error": msg, "kind": kind or type(err).__name__}))
    return 2 if kind == "UsageError" else 1
