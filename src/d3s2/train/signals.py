"""SIGINT / SIGTERM during training: stop after the current step with a checkpoint, or, when no step ends after
the signal (a rank blocked in a collective whose peer is gone), exit without one once a grace period is over."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

__all__ = ["StopOnSignal"]


class _Unit(NamedTuple):
    """The work the watchdog waits on: replaced whole, so the watchdog thread reads one consistent value."""

    name: str  # "step", "validation batch", "checkpoint gather": named in the log line
    began: float  # when it began (the end of the one before, or of an unwatched block)
    compared_with: float | None  # it is stuck after the grace or twice this (an earlier one's time); None: untimed


class StopOnSignal:
    """While entered (in the main thread), SIGINT and SIGTERM set :attr:`signum` instead of ending the process,
    so the trainer can finish its step and save a checkpoint. The same signal again, a second or more later,
    exits at once (code 128 + signal, no checkpoint); sooner it is a copy: torchrun forwards the Ctrl-C that
    its workers got from the terminal too. Another signal than the first is ignored. A signal already ignored when
    the block is entered stays ignored: the parent meant the process to be immune to it (a shell ignores SIGINT in
    a command it starts with ``&`` from a script, so that a Ctrl-C at the terminal leaves that command running).

    ``grace_s`` bounds the wait for the step: once a signal has come, the next :meth:`step_done` must follow within
    ``grace_s`` seconds of the signal or of the previous step's end, whichever is later (or within twice the
    previous step's time, if that is longer: a slow but healthy rank still gets to its checkpoint), else a watchdog
    thread ends the process at once with 128 + signal and no checkpoint. A rank blocked in a collective whose peer
    is gone never gets back to Python to run the handler; torchrun would SIGKILL it only 30 s after its SIGTERM,
    and a checkpoint of that state would be wrong anyway. The watchdog learns of the signal through the wakeup fd
    (:func:`signal.set_wakeup_fd`), which the C-level handler writes while the main thread is blocked.

    Work between steps that holds collectives too is timed in :meth:`units` blocks of its own (validation batches,
    a checkpoint's gathering of the ranks' states) or :meth:`brief` ones (the writer's barrier after a checkpoint);
    the time inside :meth:`unwatched` blocks (file writes, which an exit would leave as temporaries, and waits as
    long as a write) does not count.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_AFTER_S = 1.0
    POLL_S = 0.05  # how often the watchdog looks at the clock once a signal has come

    def __init__(self, *, grace_s: float | None = None) -> None:
        self.signum: int | None = None
        self.grace_s = grace_s
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}
        self._unit = _Unit("step", time.monotonic(), 0.0)
        self._took: dict[str, float] = {}  # name -> how long the last units() block of that name took
        self._watchdog: threading.Thread | None = None
        self._leaving = False  # the block is being left: the watchdog returns
        self._wakeup_write = -1
        self._previous_wakeup = -1

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is not threading.main_thread():  # Python runs signal handlers there only
            return self
        caught = [sig for sig in self.SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]
        self._previous = {sig: signal.signal(sig, self._handle) for sig in caught}
        self._unit = self._unit._replace(began=time.monotonic())
        if self.grace_s is not None and caught:
            wakeup_read, self._wakeup_write = os.pipe()
            os.set_blocking(self._wakeup_write, False)
            self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
            self._leaving = False
            self._watchdog = threading.Thread(target=self._watch, args=(wakeup_read,), name="d3s2-stop-watchdog",
                                              daemon=True)
            self._watchdog.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._watchdog is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            # A byte, not the pipe's end: DataLoader workers forked inside the block hold the write end open too.
            self._leaving = True
            os.write(self._wakeup_write, b"\0")
            self._watchdog.join()
            os.close(self._wakeup_write)
            self._watchdog = None

    def step_done(self) -> None:
        """A training step ended: the watchdog's sign that this process is not stuck."""
        now = time.monotonic()
        self._unit = _Unit("step", now, now - self._unit.began)

    @contextlib.contextmanager
    def units(self, name: str, *, slowest_share: float = 1.0) -> Iterator[Callable[[], None]]:
        """A block of work other than steps, in units named ``name`` (``"validation batch"``): call the function it
        yields as each unit ends; the block's end ends the last one (a block without calls is one unit).

        Each unit must end within the grace or twice the time the block has taken before it (times
        ``slowest_share``) or twice the time the previous block of that name took (validation after validation,
        checkpoint after checkpoint), whichever is longest; the first unit of the first such block is not timed, as
        nothing tells how long it may take. Not the last unit's time, as for steps: where the ranks do not
        synchronise within the block (validation under DDP), a rank waits at its end for the slowest one's whole
        share, which ``slowest_share`` says the size of against this rank's (its tokens against ours: ≥ 1). Steps
        keep their own time: the next step is compared with the last one, and gets a full grace period from the
        block's end.
        """
        outer = self._unit
        previous = self._took.get(name)
        began = time.monotonic()

        def unit_done() -> None:
            now = time.monotonic()
            self._unit = _Unit(name, now, max((now - began) * slowest_share, previous or 0.0))

        self._unit = _Unit(name, began, previous)
        try:
            yield unit_done
            self._took[name] = time.monotonic() - began
        finally:
            self._unit = outer._replace(began=time.monotonic())

    @contextlib.contextmanager
    def brief(self, name: str) -> Iterator[None]:
        """A block that ends at once unless a peer is gone (a barrier the other ranks already wait in): timed
        against the grace alone, from its start."""
        outer = self._unit
        self._unit = _Unit(name, time.monotonic(), 0.0)
        try:
            yield
        finally:
            self._unit = outer._replace(began=time.monotonic())

    @contextlib.contextmanager
    def unwatched(self) -> Iterator[None]:
        """A block that is not timed (a checkpoint write, a wait as long as one): the watchdog waits however long it
        takes, and the work in progress before it gets a full grace period from its end."""
        outer = self._unit
        self._unit = outer._replace(compared_with=None)
        try:
            yield
        finally:
            self._unit = outer._replace(began=time.monotonic())

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self._received_at = signum, time.monotonic()
            log.warning("%s received: stopping after this step with a checkpoint (send it again to stop at once "
                        "without one)", signal.Signals(signum).name)
        elif signum == self.signum and time.monotonic() - self._received_at >= self.REPEAT_AFTER_S:
            raise SystemExit(128 + signum)

    def _watch(self, wakeup_read: int) -> None:
        """The watchdog thread: wait for the first SIGINT / SIGTERM, then for steps, until the block is left."""
        first: int | None = None
        received_at = 0.0
        try:
            while True:
                ready, _, _ = select.select([wakeup_read], [], [], None if first is None else self.POLL_S)
                if ready:
                    signums = os.read(wakeup_read, 256)  # one byte per signal, any signal with a Python handler
                    if self._leaving:
                        return
                    if first is None and (ours := [s for s in signums if s in self.SIGNALS]):
                        first, received_at = ours[0], time.monotonic()
                if first is not None:
                    self._exit_if_stuck(first, received_at)
        finally:
            os.close(wakeup_read)

    def _exit_if_stuck(self, signum: int, received_at: float) -> None:
        unit = self._unit
        if unit.compared_with is None:
            return
        grace = max(self.grace_s or 0.0, 2 * unit.compared_with)
        waited = time.monotonic() - max(received_at, unit.began)
        if waited < grace:
            return
        log.error("%s received, and no %s ended in the %.1f s since (train.stop_grace_s, or twice the time of "
                  "earlier work): blocked in a collective whose peer is gone? Exiting with %d, without a checkpoint",
                  signal.Signals(signum).name, unit.name, grace, 128 + signum)
        os._exit(128 + signum)  # the main thread cannot be interrupted in C code; checkpoints are written unwatched
