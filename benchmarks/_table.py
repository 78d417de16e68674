"""The short table every benchmark script prints last (and its JSON file)."""

from __future__ import annotations

import json
from pathlib import Path


def finish(rows: list[tuple[str, str]], results: dict, json_path: str | None) -> None:
    """Write ``results`` to ``json_path`` (if given), then print ``rows`` aligned."""
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str))
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
