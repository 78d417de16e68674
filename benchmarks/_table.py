"""What every benchmark script shares: seconds per iteration, the short table it prints
last (and its JSON file)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


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
