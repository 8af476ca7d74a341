"""``d3s2 reconstruct`` and ``d3s2 eval vae`` with tiny weights (validity, not quality: the weights are random;
test_task.py checks reconstruction quality after overfitting)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from d3s2.cli import main
from d3s2.models.registry import save_pretrained
from d3s2.models.vae import SparseSDFVAE
from d3s2.models.vae.cli import WEIGHTS_ENV
from d3s2.models.vae.task import TASK_FILE
from tests.models.vae._cases import tiny_config
from tests.models.vae._data import BAND, build_tiny

KEYS = {"chamfer_l1", "fscore@0.01", "fscore@0.005", "normal_consistency", "volume_iou", "watertight", "empty_mesh"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A randomly initialised tiny SS-VAE (seed 0: its decoded SDF changes sign, so surfaces are non-empty)."""
    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config())
    out = save_pretrained(model, tmp_path_factory.mktemp("weights"))
    (out / TASK_FILE).write_text(json.dumps({"band": BAND, "resolutions": [32]}))
    return out


@pytest.fixture(scope="module")
def refinable_weights(tmp_path_factory) -> Path:
    """A tiny SS-VAE with a random output head (the zero-initialised one passes no gradient to the latent)."""
    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config())
    torch.nn.init.normal_(model.decoder.out_layer.weight, std=0.3)
    out = save_pretrained(model, tmp_path_factory.mktemp("refinable"))
    (out / TASK_FILE).write_text(json.dumps({"band": BAND, "resolutions": [32]}))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("vae_cli"))


def test_reconstruct_writes_a_watertight_glb_in_input_units(weights, tmp_path, capsys):
    src = trimesh.creation.icosphere(2, radius=3.0)
    src.apply_translation([10.0, -2.0, 0.5])
    src.export(tmp_path / "sphere.obj")
    out = tmp_path / "out" / "sphere.glb"
    assert main(["reconstruct", str(tmp_path / "sphere.obj"), "-o", str(out), "--resolution", "32",
                 "--weights", str(weights)]) == 0
    assert "watertight=True" in capsys.readouterr().out
    mesh = trimesh.load(out, force="mesh")
    assert len(mesh.faces) > 0 and mesh.is_watertight
    # de-normalised: inside the input's bounding box grown by the normalisation margin (1/0.95) and a voxel
    lo, hi = src.bounds
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2 / 0.95 + 2 * 3.0 / 16
    assert np.all(np.abs(mesh.vertices - centre) <= half), (mesh.bounds, centre, half)
    assert not list(out.parent.glob(".*"))


def test_reconstruct_errors(weights, tmp_path, capsys, monkeypatch):
    trimesh.creation.box().export(tmp_path / "box.obj")
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr("d3s2.models.vae.cli.bundled_vae_dir", lambda: tmp_path / "no_bundled_vae")
    assert main(["reconstruct", str(tmp_path / "box.obj"), "-o", str(tmp_path / "o.glb"), "--resolution", "32"]) == 1
    assert "no SS-VAE weights" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "box.obj"), "-o", str(tmp_path / "o.glb"), "--resolution", "32",
                 "--weights", str(tmp_path / "missing")]) == 1
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "bad.obj").write_text("v 0 0 0\nv 1 0 0\n")
    assert main(["reconstruct", str(tmp_path / "bad.obj"), "-o", str(tmp_path / "o.glb"), "--resolution", "32",
                 "--weights", str(weights)]) == 1
    assert "bad.obj" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "box.obj"), "-o", str(tmp_path / "o.glb"), "--resolution", "30",
                 "--weights", str(weights)]) == 1
    assert "multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "o.glb").exists()


def _no_work(*args, **kwargs):
    pytest.fail("the weights were loaded before the arguments were checked")


@pytest.mark.parametrize("extra,message", [
    (["-o", "{tmp}/o.xyz"], "unsupported export format 'xyz', expected one of glb, obj, ply, stl"),
    (["-o", "{tmp}/o.off"], "unsupported export format 'off'"),
    (["-o", "{tmp}/folder.glb"], "folder.glb is a directory, expected a mesh file name"),
    (["-o", "{tmp}/box.obj/sub/o.glb"], "box.obj is a file, expected a directory"),
    (["-o", "{tmp}/o.glb", "--band", "0"], "--band must be > 0, got 0"),
    (["-o", "{tmp}/o.glb", "--band", "-0.01"], "--band must be > 0, got -0.01"),
])
def test_reconstruct_checks_its_arguments_first(weights, tmp_path, capsys, monkeypatch, extra, message):
    trimesh.creation.box().export(tmp_path / "box.obj")
    (tmp_path / "folder.glb").mkdir()
    monkeypatch.setattr("d3s2.models.vae.cli._load", _no_work)
    args = [x.format(tmp=tmp_path) for x in extra]
    assert main(["reconstruct", str(tmp_path / "box.obj"), "--resolution", "32", "--weights", str(weights),
                 *args]) == 1
    assert message in capsys.readouterr().err


def test_reconstruct_help_lists_the_export_formats(capsys):
    from d3s2.geometry.export import EXPORT_FORMATS

    with pytest.raises(SystemExit):
        main(["reconstruct", "--help"])
    assert f"output mesh ({', '.join(EXPORT_FORMATS)})" in " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_is_a_clear_error(weights, data, tmp_path, capsys, monkeypatch):
    trimesh.creation.box().export(tmp_path / "box.obj")
    monkeypatch.setattr("d3s2.models.vae.cli._load", _no_work)
    assert main(["reconstruct", str(tmp_path / "box.obj"), "-o", str(tmp_path / "o.glb"), "--resolution", "32",
                 "--weights", str(weights), "--device", "cuda"]) == 1
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    assert main(["eval", "vae", "--data", str(data), "--weights", str(weights), "--device", "cuda"]) == 1
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


def test_band_flag_wins_over_the_weights_task_file(weights, tmp_path, capsys, monkeypatch):
    trimesh.creation.box().export(tmp_path / "box.obj")
    used = []

    def record_band(model, mesh, resolution, band, **kwargs):
        used.append(band)
        return mesh

    monkeypatch.setattr("d3s2.models.vae.cli.reconstruct_mesh", record_band)
    args = ["reconstruct", str(tmp_path / "box.obj"), "-o", str(tmp_path / "o.glb"), "--resolution", "32",
            "--weights", str(weights)]
    assert main(args) == 0 and main([*args, "--band", "0.05"]) == 0
    assert used == [BAND, 0.05]


def test_eval_refuses_a_band_of_zero(weights, data, capsys, monkeypatch):
    monkeypatch.setattr("d3s2.models.vae.cli._load", _no_work)
    assert main(["eval", "vae", "--data", str(data), "--weights", str(weights), "--band", "0"]) == 1
    assert "--band must be > 0, got 0" in capsys.readouterr().err


def test_reconstruct_refuses_an_empty_surface(tmp_path, capsys):
    model = SparseSDFVAE(tiny_config())
    with torch.no_grad():  # decoder output +1 everywhere: no zero crossing
        model.decoder.out_layer.weight.zero_()
        model.decoder.out_layer.bias.fill_(10.0)
    save_pretrained(model, tmp_path / "w")
    # a thin plate: no enclosed empty blocks, so the closed-mesh halo is all outside too
    trimesh.creation.box((1.0, 1.0, 0.02)).export(tmp_path / "box.obj")
    assert main(["reconstruct", str(tmp_path / "box.obj"), "-o", str(tmp_path / "o.glb"), "--resolution", "32",
                 "--weights", str(tmp_path / "w"), "--band", str(BAND)]) == 1
    assert "reconstruction is empty" in capsys.readouterr().err
    assert not (tmp_path / "o.glb").exists()


def test_eval_prints_and_writes_metrics(weights, data, tmp_path, capsys):
    report = tmp_path / "metrics.json"
    assert main(["eval", "vae", "--data", str(data), "--weights", str(weights), "--split", "train",
                 "--resolution", "32", "--limit", "1", "--samples", "1000", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    for key in ("chamfer_l1", "fscore@0.01", "fscore@0.005", "normal_consistency", "volume_iou"):
        assert key in printed
    payload = json.loads(report.read_text())
    result = payload["results"]["32"]
    assert KEYS <= set(result) and result["shapes"] == 1.0
    assert 0.0 <= result["fscore@0.01"] <= 1.0 and result["chamfer_l1"] > 0
    assert payload["refine"] == {"steps": 0, "lr": None} and "no refinement" in printed
    assert not any(k.startswith("refine") for k in result)


def test_eval_with_refinement_records_the_setting(refinable_weights, data, tmp_path, capsys, caplog):
    report = tmp_path / "metrics.json"
    with caplog.at_level(logging.INFO, logger="d3s2.progress"):
        assert main(["eval", "vae", "--data", str(data), "--weights", str(refinable_weights), "--split", "train",
                     "--resolution", "32", "--limit", "2", "--samples", "1000", "--json", str(report),
                     "--refine-steps", "3", "--refine-lr", "0.3"]) == 0
    printed, err = capsys.readouterr()
    # stderr is not a terminal here: progress as log lines, no bar frames
    assert "\r" not in err and "eval 32^3: 2/2 shapes" in caplog.text
    assert "refined, 3 Adam steps at lr 0.3" in printed and "refine_seconds" in printed
    payload = json.loads(report.read_text())
    assert payload["refine"] == {"steps": 3, "lr": 0.3}
    result = payload["results"]["32"]
    assert KEYS <= set(result) and result["shapes"] == 2.0
    assert result["refine_seconds"] > 0 and result["refine_seconds_first"] > 0
    assert result["refine_loss_end"] < result["refine_loss_start"]


def test_eval_per_shape_log_resumes_a_killed_run(weights, data, tmp_path, capsys):
    args = ["eval", "vae", "--data", str(data), "--weights", str(weights), "--split", "train", "--resolution", "32",
            "--limit", "3", "--samples", "1000"]
    full, log = tmp_path / "full.json", tmp_path / "shapes.jsonl"
    assert main([*args, "--json", str(full), "--per-shape", str(log)]) == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and len({json.loads(x)["name"] for x in lines}) == 3
    # a kill after the first shape, in the middle of writing the second line
    log.write_text(lines[0] + "\n" + lines[1][:25])
    resumed = tmp_path / "resumed.json"
    assert main([*args, "--json", str(resumed), "--per-shape", str(log)]) == 0
    again = log.read_text().splitlines()
    assert again[0] == lines[0] and len(again) == 3  # the torn line dropped, two shapes scored again
    want, got = json.loads(full.read_text())["results"]["32"], json.loads(resumed.read_text())["results"]["32"]
    assert got["shapes"] == 3.0 and got["chamfer_l1"] == pytest.approx(want["chamfer_l1"], rel=1e-9)
    capsys.readouterr()
    assert main([*args, "--per-shape", str(log), "--refine-steps", "2"]) == 1  # another setting: refused
    assert "another file" in capsys.readouterr().err


def test_reconstruct_with_refinement(refinable_weights, tmp_path, capsys):
    trimesh.creation.icosphere(2, radius=3.0).export(tmp_path / "sphere.obj")
    args = ["reconstruct", str(tmp_path / "sphere.obj"), "--resolution", "32", "--weights", str(refinable_weights)]
    assert main([*args, "-o", str(tmp_path / "a.glb"), "--refine-steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "watertight=True" in captured.out
    assert "\r" not in captured.err  # pytest's stderr is no terminal: no refinement bar frames
    assert main([*args, "-o", str(tmp_path / "b.glb"), "--refine-steps", "2", "--chunk", "2"]) == 1
    assert "decodes the whole shape" in capsys.readouterr().err
    for wrong, message in [(["--refine-steps", "-1"], "expected refine_steps >= 0 (--refine-steps), got -1"),
                           (["--refine-steps", "2", "--refine-lr", "nan"], "expected a finite refine_lr > 0"),
                           (["--refine-steps", "2", "--refine-lr", "0"], "expected a finite refine_lr > 0"),
                           (["--chunk", "-1"], "expected --chunk >= 0 (0: the whole shape at once), got -1")]:
        assert main([*args, "-o", str(tmp_path / "b.glb"), *wrong]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b.glb").exists()


def test_eval_errors(weights, data, tmp_path, capsys):
    assert main(["eval", "vae", "--data", str(tmp_path), "--weights", str(weights)]) == 1
    assert "build.json" in capsys.readouterr().err
    assert main(["eval", "vae", "--data", str(data), "--weights", str(weights), "--resolution", "64"]) == 1
    assert "not [64]" in capsys.readouterr().err


def _with_task_file(weights: Path, out: Path, **info) -> Path:
    """The weights of ``weights`` with ``info`` as their vae_task.json."""
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(weights / name, out / name)
    (out / TASK_FILE).write_text(json.dumps(info))
    return out


def _export_info_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "d3s2.models.vae.export_info"]


def _eval_json(data: Path, weights: Path, report: Path, *extra: str) -> int:
    return main(["eval", "vae", "--data", str(data), "--weights", str(weights), "--samples", "1000", "--json",
                 str(report), *extra])


def test_eval_scores_the_split_the_vae_was_trained_with(weights, data, tmp_path, capsys, caplog):
    # split_of hashes: cylinder 0.41, box 0.58, capsule 0.59, sphere 0.80; the default test split (< 0.05) is empty
    trained = _with_task_file(weights, tmp_path / "w", band=BAND, resolutions=[32], val_fraction=0.02,
                              test_fraction=0.58)
    report = tmp_path / "metrics.json"
    caplog.set_level(logging.WARNING)
    assert _eval_json(data, trained, report, "--split", "test", "--resolution", "32") == 0
    assert "split: test (val_fraction 0.02, test_fraction 0.58), band 0.0625" in capsys.readouterr().out
    payload = json.loads(report.read_text())
    assert payload["split_fractions"] == {"val_fraction": 0.02, "test_fraction": 0.58}
    result = payload["results"]["32"]
    assert result["names"] == ["meshes/box.obj", "meshes/cylinder.obj"] and result["shapes"] == 2.0
    assert not _export_info_warnings(caplog)


def test_eval_of_an_export_without_its_split_warns_and_uses_the_defaults(weights, data, tmp_path, caplog):
    report = tmp_path / "metrics.json"
    caplog.set_level(logging.WARNING)
    assert _eval_json(data, weights, report, "--split", "train", "--resolution", "32", "--limit", "1") == 0
    assert json.loads(report.read_text())["results"]["32"]["names"] == ["meshes/box.obj"]
    (warning,) = _export_info_warnings(caplog)
    assert "does not record the split" in warning and "val_fraction 0.05 and test_fraction 0.05" in warning


def test_eval_takes_the_band_of_the_vae_and_checks_the_data_against_it(weights, data, tmp_path, capsys, caplog):
    split = {"val_fraction": 0.05, "test_fraction": 0.05}
    near = _with_task_file(weights, tmp_path / "near", band=0.05, resolutions=[32], **split)
    report = tmp_path / "metrics.json"
    caplog.set_level(logging.WARNING)
    # the data (band 0.0625, resolutions 16 and 32) is scored with the VAE's band, with one warning
    assert _eval_json(data, near, report, "--split", "train", "--resolution", "16", "--limit", "1") == 0
    assert json.loads(report.read_text())["band"] == 0.05
    assert _export_info_warnings(caplog) == [f"{data} differs from the SS-VAE in band 0.0625 (the SS-VAE was "
                                             "trained with 0.05) and resolution 16 (the SS-VAE was trained at 32)"]
    far = _with_task_file(weights, tmp_path / "far", band=1 / 128, resolutions=[32], **split)
    capsys.readouterr()
    assert _eval_json(data, far, report, "--split", "train", "--resolution", "32", "--limit", "1") == 1
    assert "built with band 0.0625 but the SS-VAE takes band 0.0078125" in capsys.readouterr().err
    assert _eval_json(data, far, report, "--split", "train", "--resolution", "32", "--limit", "1",
                      "--band", "0.0625") == 0
    assert json.loads(report.read_text())["band"] == 0.0625
