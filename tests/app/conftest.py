"""Helpers for the app tests: a tiny random pipeline folder and `d3s2 serve` / `d3s2 app` in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import d3s2

from ..pipeline.tiny import tiny_pipeline


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("app_weights") / "tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """``d3s2 COMMAND --port P ...`` in a subprocess, started in ``cwd`` (with SIGINT ignored, as a shell starts a
    command with ``&`` in a script, if ``sigint_ignored``); :meth:`stop` sends SIGINT."""

    def __init__(self, command: str, weights: Path, out: Path, cwd: Path, *extra: str, ready_path: str,
                 sigint_ignored: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = out
        cwd.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # The package under test (a worktree's src/ may shadow an installed copy), one torch thread per process.
        env["PYTHONPATH"] = os.pathsep.join([str(Path(d3s2.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        env["OMP_NUM_THREADS"] = "1"
        env["GRADIO_ANALYTICS_ENABLED"] = "False"
        self.log = out.parent / f"{command}-{self.port}.log"
        self._log_fh = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "d3s2.cli", command, "--weights", str(weights), "--device", "cpu",
             "--port", str(self.port), "--out", str(out), *extra],
            cwd=cwd, env=env, stdout=self._log_fh, stderr=subprocess.STDOUT,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
        import httpx

        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{command} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{command} did not answer in 90 s:\n{self.log.read_text()}")
            time.sleep(0.3)

    def children(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, timeout: float = 30, signum: int = signal.SIGINT) -> int:
        """``signum`` (Ctrl-C's SIGINT), wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_fh.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_fh.close()


def pid_alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False
