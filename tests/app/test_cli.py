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
