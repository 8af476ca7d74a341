"""Progress of long work: a tqdm bar on a terminal, plain log lines when stderr is redirected.

Redirected to a file, every redraw of a bar is one more carriage-return frame in the log; there, long commands
log a line now and then instead (training: one per ``train.log_every`` steps; counted work: :class:`CountProgress`).
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from types import TracebackType

log = logging.getLogger(__name__)


def bar_on_terminal(progress: bool = True) -> bool:
    """Whether to draw a progress bar: ``progress`` asks for one and stderr, where tqdm draws, is a terminal."""
    return progress and sys.stderr.isatty()


class CountProgress:
    """Progress over ``total`` items: a tqdm bar on a terminal; otherwise an INFO log line every ``every_s``
    seconds and a last one when closed, such as ``data build: 40/500 assets, 2 failed, 1.31 assets/s, 0:05:51 left``.

    Args:
        total: items to do.
        desc: what is being done, the start of the bar and of each line.
        unit: one item's name (a line adds an "s").
        enabled: False shows nothing (``--no-progress``).
        every_s: seconds between two log lines.
    """

    def __init__(self, total: int, *, desc: str, unit: str, enabled: bool = True, every_s: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = self.failed = 0
        self._bar = None
        self._log_lines = enabled and not bar_on_terminal()
        if bar_on_terminal(enabled):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        self._started = self._logged_at = time.monotonic()
        self._logged_done = 0

    def update(self, n: int = 1, *, failed: int = 0) -> None:
        """``n`` more items done, ``failed`` of them failed."""
        self.done += n
        self.failed += failed
        if self._bar is not None:
            self._bar.update(n)
            if self.failed:
                self._bar.set_postfix(failed=self.failed)
        elif self._log_lines:
            now = time.monotonic()
            if now - self._logged_at >= self.every_s:
                self._log_line(now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._log_lines and self.done > self._logged_done:
            self._log_line(time.monotonic())

    def __enter__(self) -> CountProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _log_line(self, now: float) -> None:
        rate = self.done / max(now - self._started, 1e-9)
        failed = f", {self.failed} failed" if self.failed else ""
        left = ""
        if self.done < self.total:
            left = f", {datetime.timedelta(seconds=round((self.total - self.done) / rate)) if rate > 0 else '?'} left"
        log.info("%s: %d/%d %ss%s, %.3g %ss/s%s", self.desc, self.done, self.total, self.unit, failed, rate,
                 self.unit, left)
        self._logged_at, self._logged_done = now, self.done
