"""Progress: a tqdm bar on a terminal, plain log lines (no carriage-return frames) when stderr is redirected."""

import io
import logging
import sys

import pytest

from d3s2 import progress as progress_mod
from d3s2.progress import CountProgress, bar_on_terminal


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "d3s2.progress"]


def test_off_a_terminal_a_line_every_few_seconds_and_a_last_one(monkeypatch, capsys, caplog):
    clock = iter(range(0, 1000, 4))  # every call to the clock is 4 s later
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    assert not bar_on_terminal()  # pytest captures stderr
    with caplog.at_level(logging.INFO), CountProgress(5, desc="data build", unit="asset", every_s=10) as bar:
        for i in range(5):
            bar.update(1, failed=int(i == 1))
    # Started at 0 s; updates at 4, 8, 12 (a line), 16, 20 s; closed at 24 s (the last line).
    assert _lines(caplog) == ["data build: 3/5 assets, 1 failed, 0.25 assets/s, 0:00:08 left",
                              "data build: 5/5 assets, 1 failed, 0.208 assets/s"]
    assert capsys.readouterr().err == ""  # no bar frames in the log


def test_on_a_terminal_a_bar_and_no_lines(monkeypatch, caplog):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert bar_on_terminal() and not bar_on_terminal(False)
    with caplog.at_level(logging.INFO), CountProgress(3, desc="data build", unit="asset", every_s=0) as bar:
        bar.update(3)
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert _lines(caplog) == []


@pytest.mark.parametrize("terminal", [True, False])
def test_no_progress_shows_nothing(terminal, monkeypatch, capsys, caplog):
    if terminal:
        monkeypatch.setattr("sys.stderr", _Terminal())
    with caplog.at_level(logging.INFO), CountProgress(3, desc="x", unit="asset", enabled=False, every_s=0) as bar:
        bar.update(3)
    shown = sys.stderr.getvalue() if terminal else capsys.readouterr().err
    assert shown == "" and _lines(caplog) == []
