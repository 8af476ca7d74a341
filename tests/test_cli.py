"""The `d3s2` entry point: version, and how user errors and Ctrl-C end a command."""

import os
import signal

import pytest

import d3s2
import d3s2.doctor
from d3s2.cli import Terminated, main, resolve_device
from d3s2.fileio import atomic_path


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"d3s2 {d3s2.__version__}"


def test_ctrl_c_ends_a_command_without_a_traceback(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(d3s2.doctor, "report", interrupted)
    assert main(["doctor"]) == 130
    assert capsys.readouterr().err == "d3s2 doctor: interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # -v keeps the traceback
        main(["-v", "doctor"])


def test_sigterm_ends_a_command_and_removes_the_file_it_was_writing(monkeypatch, tmp_path, capsys):
    target = tmp_path / "mesh.glb"

    def killed_while_writing():
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a mesh")
            os.kill(os.getpid(), signal.SIGTERM)  # raised here, in the main thread, as Ctrl-C would be

    monkeypatch.setattr(d3s2.doctor, "report", killed_while_writing)
    assert main(["doctor"]) == 143
    assert capsys.readouterr().err == "d3s2 doctor: terminated\n"
    assert list(tmp_path.iterdir()) == []  # no mesh.glb, no temporary beside it
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored for whatever runs next
    with pytest.raises(Terminated):  # -v keeps the traceback
        main(["-v", "doctor"])


def test_device_names_are_checked():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="expected --device cpu, cuda or cuda:N, got 'tpu'"):
        resolve_device("tpu")
