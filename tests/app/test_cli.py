"""`d3s2 app` / `d3s2 serve` argument errors (no server started)."""

from __future__ import annotations

import pytest

from d3s2.cli import build_parser, main


def test_commands_registered():
    args = build_parser().parse_args(["serve", "--weights", "w"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.out == "out/serve"
    args = build_parser().parse_args(["app", "--weights", "w"])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.out == "out/app"


@pytest.mark.parametrize("command", ["app", "serve"])
def test_argument_errors(command, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("D3S2_WEIGHTS", raising=False)
    monkeypatch.setattr("d3s2.pipeline.demo_weights_dir", lambda: tmp_path / "no_demo_pipeline")
    assert main([command, "--out", str(tmp_path / "out")]) == 1
    assert "the bundled demo pipeline is missing" in capsys.readouterr().err
    assert main([command, "--weights", str(tmp_path), "--max-queue", "0"]) == 1
    assert "--max-queue must be positive, got 0" in capsys.readouterr().err
    assert main([command, "--weights", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
    assert "weights folder not found" in capsys.readouterr().err


def test_no_cuda_is_a_clear_error(tiny_weights, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["serve", "--weights", str(tiny_weights), "--device", "cuda", "--out", str(tmp_path)]) == 1
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
