"""Whether progress bars show: the argument, then PEEKCORE_PROGRESS, then the terminal."""

from __future__ import annotations

import io

import numpy as np
import pytest
from torch import nn

import peekcore
from peekcore._progress import ENV_VAR, resolve_progress
from peekcore.errors import InvalidArgumentError, InvalidTypeError


class Stream(io.StringIO):
    """A stderr stand-in that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def no_env(monkeypatch):
    """The suite turns bars off for every test (conftest); these tests start from unset."""
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "pipe"])
def test_default_is_whether_the_stream_is_a_terminal(no_env, tty):
    assert resolve_progress(None, Stream(tty)) is tty
    assert resolve_progress(stream=Stream(tty)) is tty


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "pipe"])
def test_default_stream_is_stderr_at_call_time(no_env, monkeypatch, tty):
    monkeypatch.setattr("sys.stderr", Stream(tty))
    assert resolve_progress(None) is tty


def test_a_stream_without_isatty_or_closed_is_no_terminal(no_env):
    assert resolve_progress(None, object()) is False
    closed = io.StringIO()
    closed.close()
    assert resolve_progress(None, closed) is False


@pytest.mark.parametrize(
    ("value", "tty", "want"),
    [("0", True, False), ("1", False, True), (" 1 ", False, True), ("", True, True)],
    ids=["off-on-terminal", "on-into-pipe", "spaces", "empty-is-unset"],
)
def test_environment_sets_the_default(monkeypatch, value, tty, want):
    monkeypatch.setenv(ENV_VAR, value)
    assert resolve_progress(None, Stream(tty)) is want


@pytest.mark.parametrize(("value", "asked"), [("0", True), ("1", False)], ids=["env-off", "env-on"])
@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "pipe"])
def test_an_explicit_argument_wins_over_the_environment(monkeypatch, value, asked, tty):
    monkeypatch.setenv(ENV_VAR, value)
    assert resolve_progress(asked, Stream(tty)) is asked
    assert resolve_progress(np.bool_(asked), Stream(tty)) is asked


@pytest.mark.parametrize("value", ["yes", "true", "2", "off", "00"])
@pytest.mark.parametrize("asked", [None, True, False], ids=["default", "on", "off"])
def test_a_bad_environment_value_is_refused_naming_the_allowed_ones(monkeypatch, value, asked):
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(InvalidArgumentError) as err:
        resolve_progress(asked, Stream(True))
    msg = str(err.value)
    assert f"{ENV_VAR}={value!r}" in msg
    assert f"{ENV_VAR}=0" in msg and f"{ENV_VAR}=1" in msg and "unset" in msg
    assert isinstance(err.value, ValueError)  # `except ValueError` callers still catch it


@pytest.mark.parametrize("asked", ["false", 2, 0.5, [True]], ids=["str", "two", "float", "list"])
def test_a_progress_argument_that_is_not_a_bool_is_refused(no_env, asked):
    with pytest.raises(InvalidTypeError, match="progress must be True, False or None"):
        resolve_progress(asked, Stream(True))


@pytest.mark.parametrize(("value", "shown"), [("1", True), ("0", False)], ids=["on", "off"])
def test_fits_and_captures_follow_the_environment(monkeypatch, tmp_path, value, shown):
    """Both places that draw bars: the fit loop and the capture driver."""
    monkeypatch.setenv(ENV_VAR, value)
    terminal = Stream(True)  # only the variable can turn bars off on it
    monkeypatch.setattr("sys.stderr", terminal)
    x = np.random.default_rng(0).standard_normal((24, 3, 4)).astype(np.float32)
    peekcore.cp_als(x, 2, n_iter_max=3, tol=0)
    peekcore.capture(nn.Sequential(nn.Identity()), x, "0", tmp_path / "s.zarr", chunk_size=8)
    drawn = terminal.getvalue()
    assert ("it/s" in drawn) is shown and ("img/s" in drawn) is shown
