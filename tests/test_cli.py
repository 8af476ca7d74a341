"""The `d3s2` entry point: version, and how user errors and Ctrl-C end a command."""

import pytest

import d3s2
import d3s2.doctor
from d3s2.cli import main, resolve_device


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


def test_device_names_are_checked():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="expected --device cpu, cuda or cuda:N, got 'tpu'"):
        resolve_device("tpu")
