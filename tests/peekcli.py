"""Running the installed ``peek`` script in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def peek_script() -> str:
    """The ``peek`` script installed beside this Python (the one a user runs)."""
    script = Path(sys.executable).with_name("peek")
    if script.exists():
        return str(script)
    found = shutil.which("peek")
    if found is None:
        pytest.skip("the peek script is not installed (pip install -e .)")
    return found


def run_peek(*argv: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """Run ``peek ARGV`` in ``cwd``; returns the CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [peek_script(), *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def run_peek_json(*argv: str, cwd: Path, env: dict | None = None):
    """Run ``peek --json ARGV``: (exit code, the one JSON document on stdout, stderr)."""
    out = run_peek("--json", *argv, cwd=cwd, env=env)
    return out.returncode, json.loads(out.stdout), out.stderr
