"""`d3s2 app` / `d3s2 serve` argument errors (no server started)."""

from __future__ import annotations

import socket

import pytest

from d3s2.cli import build_parser, main

from .conftest import free_port


def test_commands_registered():
    args = build_parser().parse_args(["serve", "--weights", "w"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.out == "out/serve"
    assert not hasattr(args, "uploads_cap_mb")  # the service keeps uploads in memory
    args = build_parser().parse_args(["app", "--weights", "w"])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.out == "out/app"
    assert args.uploads_cap_mb == 256.0


@pytest.mark.parametrize("command", ["app", "serve"])
def test_argument_errors(command, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("D3S2_WEIGHTS", raising=False)
    monkeypatch.setattr("d3s2.pipeline.demo_weights_dir", lambda: tmp_path / "no_demo_pipeline")
    assert main([command, "--out", str(tmp_path / "out")]) == 1
    assert "the bundled demo pipeline is missing" in capsys.readouterr().err
    assert main([command, "--weights", str(tmp_path), "--max-queue", "0"]) == 1
    assert "--max-queue must be a finite number > 0, got 0" in capsys.readouterr().err
    assert main([command, "--weights", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
    assert "weights folder not found" in capsys.readouterr().err


def test_no_cuda_is_a_clear_error(tiny_weights, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["serve", "--weights", str(tiny_weights), "--device", "cuda", "--out", str(tmp_path),
                 "--port", str(free_port())]) == 1
    assert "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["app", "serve"])
@pytest.mark.parametrize("port", ["0", "99999", "-1", "http"])
def test_a_bad_port_is_refused_while_parsing(command, port, tmp_path, capsys):
    # Refused before any model is loaded or the output folder is created.
    with pytest.raises(SystemExit) as exit_:
        main([command, "--weights", str(tmp_path), "--out", str(tmp_path / "out"), "--port", port])
    assert exit_.value.code == 2
    assert f"argument --port: expected a port number 1-65535, got '{port}'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert build_parser().parse_args([command, "--port", "65535"]).port == 65535


@pytest.mark.parametrize("command", ["app", "serve"])
def test_help_shows_the_max_pixels_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "(default 4096² = 16777216)" in " ".join(capsys.readouterr().out.split())


@pytest.fixture
def no_model_loads(monkeypatch):
    """An error instead of a server: the test fails, not hangs, when a command goes as far as loading."""
    from d3s2.app.engine import Engine

    def load(*args, **kwargs):
        raise AssertionError("the models loaded: the command passed its checks")

    monkeypatch.setattr(Engine, "from_weights", load)


@pytest.mark.parametrize("command", ["app", "serve"])
@pytest.mark.parametrize(("option", "value"), [("--timeout", "nan"), ("--timeout", "inf"), ("--max-upload-mb", "inf"),
                                               ("--results-cap-mb", "nan"), ("--band", "nan"), ("--band", "-1")])
def test_a_limit_that_is_no_finite_positive_number_is_refused(command, option, value, tiny_weights, tmp_path,
                                                               capsys, no_model_loads):
    # nan passed the old `<= 0` check (a job that never times out), inf overflowed the byte counts (a traceback)
    assert main([command, "--weights", str(tiny_weights), "--out", str(tmp_path / "out"), option, value]) == 1
    assert f"{option} must be a finite number > 0, got {float(value)}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "nan"])
def test_the_uploads_cap_must_be_a_finite_positive_number(value, tiny_weights, tmp_path, capsys, no_model_loads):
    assert main(["app", "--weights", str(tiny_weights), "--out", str(tmp_path / "out"), "--uploads-cap-mb", value]) == 1
    assert f"--uploads-cap-mb must be a finite number > 0, got {float(value)}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["app", "serve"])
def test_a_busy_port_is_one_error_before_any_model_loads(command, tiny_weights, tmp_path, capsys, no_model_loads):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main([command, "--weights", str(tiny_weights), "--out", str(tmp_path / "out"), "--port", str(port)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"d3s2 {command}: error: 127.0.0.1:{port} is already in use" in err and "pick another --port" in err
    assert not (tmp_path / "out").exists()


def test_the_port_is_held_from_the_check_until_closed():
    from d3s2.app.cli import listening_sockets

    port = free_port()
    with listening_sockets("127.0.0.1", port) as sockets:
        assert [s.getsockname() for s in sockets] == [("127.0.0.1", port)]
        with pytest.raises(OSError, match=f"127.0.0.1:{port} is already in use"):  # no one else can take it
            with listening_sockets("127.0.0.1", port):
                pass
    assert all(s.fileno() == -1 for s in sockets)  # closed: nothing stays bound
    with listening_sockets("127.0.0.1", port):
        pass
