"""What every benchmark script shares: the standard case's options, seconds per
iteration, the short table it prints last (and its JSON file)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def case_parser(doc: str) -> argparse.ArgumentParser:
    """A parser holding the standard case's options: ``--n`` samples x ``--c``
    channels x ``--s`` spatial positions (default 2000 x 256 x 196) and
    ``--rank`` (default 16); ``doc``'s first line describes the script."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--c", type=int, default=256)
    parser.add_argument("--s", type=int, default=196)
    parser.add_argument("--rank", type=int, default=16)
    return parser


def per_iteration(model) -> float:
    """Median seconds of a fit's iterations, leaving out the first (it also measures
    and vets the data) unless it is the only one."""
    s = model.history.seconds
    return float(statistics.median(s[1:] if len(s) > 1 else s))


def finish(rows: list[tuple[str, str]], results: dict, json_path: str | None) -> None:
    """Write ``results`` to ``json_path`` (if given), then print ``rows`` aligned."""
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str))
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
