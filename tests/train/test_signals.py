"""The watchdog of StopOnSignal, which ends a process whose step is stuck after a signal: the tests that send a
signal run it in a process of their own (tests/train/test_run_control.py has the rest of StopOnSignal)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import d3s2
from d3s2.train.trainer import StopOnSignal

from .conftest import TINY, _merge


def test_the_watchdog_leaves_with_the_block():
    with StopOnSignal(grace_s=5.0):
        assert "d3s2-stop-watchdog" in [thread.name for thread in threading.enumerate()]
    assert "d3s2-stop-watchdog" not in [thread.name for thread in threading.enumerate()]
    assert signal.set_wakeup_fd(-1) == -1  # given back


def _run(body: str) -> tuple[subprocess.CompletedProcess, float]:
    """``body`` in a new python with os, signal, threading, time and StopOnSignal imported; its result and seconds."""
    code = "import os, signal, threading, time\nfrom d3s2.train.signals import StopOnSignal\n" + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(d3s2.__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - start


def test_a_step_still_running_a_grace_period_after_the_signal_ends_the_process():
    # The lock is never released: the handler runs, and the step never ends (a collective whose peer is gone).
    done, seconds = _run("""
        with StopOnSignal(grace_s=0.5) as signals:
            signals.step_done()
            os.kill(os.getpid(), signal.SIGTERM)
            stuck = threading.Lock()
            stuck.acquire()
            stuck.acquire()
        print("left the block")
    """)
    assert done.returncode == 128 + signal.SIGTERM and not done.stdout, done.stderr
    assert "SIGTERM received, and no step ended in the 0.5 s since" in done.stderr
    assert 0.5 <= seconds < 30


def test_unwatched_blocks_and_slow_steps_are_waited_for():
    # Steps twice as long as the grace period (each within twice the previous one's time), and after the signal a
    # checkpoint write (unwatched) longer than twice a step.
    done, _ = _run("""
        with StopOnSignal(grace_s=0.2) as signals:
            time.sleep(0.4)
            signals.step_done()
            os.kill(os.getpid(), signal.SIGINT)
            with signals.unwatched():
                time.sleep(1.2)
            for _ in range(2):
                time.sleep(0.4)
                signals.step_done()
        print(signals.signum)
    """)
    assert done.returncode == 0 and done.stdout == f"{int(signal.SIGINT)}\n", done.stderr


def test_units_are_timed_against_the_work_before_them():
    # A checkpoint's gathering, twice: the first is not timed (nothing tells how long it takes), the second is
    # compared with the first, and it never ends (a collective whose peer is gone).
    done, seconds = _run("""
        with StopOnSignal(grace_s=0.2) as signals:
            signals.step_done()
            os.kill(os.getpid(), signal.SIGTERM)
            with signals.units("checkpoint gather"):
                time.sleep(0.6)
            print("gathered", flush=True)
            stuck = threading.Lock()
            with signals.units("checkpoint gather"):
                stuck.acquire()
                stuck.acquire()
    """)
    assert done.returncode == 128 + signal.SIGTERM and done.stdout == "gathered\n", done.stderr
    assert re.search(r"SIGTERM received, and no checkpoint gather ended in the 1\.\d s since", done.stderr)
    assert 0.6 + 1.2 <= seconds < 30


def test_a_slow_validation_after_a_signal_ends_and_the_run_stops_with_a_checkpoint(tmp_path):
    # Each validation batch takes 0.6 s, three times train.stop_grace_s, and the toy's steps a few ms. SIGTERM comes
    # in the first batch of the first validation (after step 1): the first batch of the run's first validation is
    # not timed, the second is compared with the validation's time before it, and the run, one process that checks
    # for a signal after every step, stops after that validation with a checkpoint.
    cfg = _merge(TINY, {"task": {"args": {"num_val": 2}}, "train": {"max_steps": 100, "val_every": 1,
                                                                  "stop_grace_s": 0.2},
                        "data": {"max_batch_size": 1}})  # one shape per batch: two validation batches
    done, _ = _run(f"""
        from d3s2.train.toy import ToyTask
        from d3s2.train.trainer import Trainer, build_train_config

        real_validate = ToyTask.validate

        def slow_validate(self, model, loader, *, step, out_dir):
            def slow(batches):
                for i, batch in enumerate(batches):
                    if i == 0:
                        os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.6)
                    yield batch
            return real_validate(self, model, slow(loader), step=step, out_dir=out_dir)

        ToyTask.validate = slow_validate
        trainer = Trainer(build_train_config({cfg!r}), {str(tmp_path / "run")!r})
        trainer.run()
        print(trainer.interrupted, trainer.step)
    """)
    assert done.returncode == 0 and done.stdout == f"{int(signal.SIGTERM)} 1\n", done.stderr[-3000:]
    assert "no validation batch ended" not in done.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_00000001.pt").is_file()
