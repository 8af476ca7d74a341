"""``d3s2 data encode``: the latent folder format, agreement with the VAE's own encoder, resuming, clear errors."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from d3s2.cli import main
from d3s2.data.dataset import SparseSDFDataset
from d3s2.data.encode import encode_folder, latent_names, load_latent, load_vae, read_settings
from d3s2.sparse import SparseTensor


def test_format_and_round_trip(tiny_encoded):
    data, vae_dir, latents = tiny_encoded
    settings = json.loads((latents / "encoded.json").read_text())
    assert settings == {"format": "d3s2-latents", "resolution": 32, "latent_resolution": 4, "channels": 8,
                        "band": 0.0625, "vae": str(vae_dir), "refine_steps": 0,
                        "vae_sha256": hashlib.sha256((vae_dir / "model.safetensors").read_bytes()).hexdigest()}
    ds = SparseSDFDataset(data, 32, split=None, with_blocks="packed", with_image=False)
    assert latent_names(latents) == ds.names and "/" in ds.names[0]
    vae, band = load_vae(vae_dir)
    for i, name in enumerate(ds.names):
        lat = load_latent(latents, name)
        assert lat["coords"].dtype == np.int16 and lat["mean"].dtype == lat["logvar"].dtype == np.float16
        c = lat["coords"].astype(np.int64)
        assert np.array_equal(np.lexsort((c[:, 2], c[:, 1], c[:, 0])), np.arange(len(c)))  # lexicographic
        item = ds[i]
        # the latent voxels are the occupied 8³ blocks: every block of the band plus those that close it
        assert {tuple(r) for r in c} == {tuple(r) for r in item["block_coords"].numpy()}
        assert {tuple(r) for r in c} >= {tuple(r) for r in (item["coords"].numpy() // 8)}
        blocks = item["block_coords"]
        structure = SparseTensor.from_samples([blocks], [torch.zeros(len(blocks), 0)], resolution=4)
        with torch.no_grad():
            z, post = vae.encode(SparseTensor.from_samples([item["coords"]], [item["sdf"].reshape(-1, 1) / band],
                                                           resolution=32), sample_posterior=False, structure=structure)
        zc = z.coords[:, 1:].numpy().astype(np.int64)
        order = np.lexsort((zc[:, 2], zc[:, 1], zc[:, 0]))
        assert np.array_equal(zc[order], c)
        np.testing.assert_allclose(lat["mean"].astype(np.float32), post.mean.numpy()[order], atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(lat["logvar"].astype(np.float32), post.logvar.numpy()[order], atol=2e-3,
                                   rtol=2e-3)


def test_resume_and_errors(tiny_encoded, tmp_path, capsys):
    data, vae_dir, latents = tiny_encoded
    args = ["data", "encode", "--data", str(data), "--vae", str(vae_dir), "--resolution", "32", "--no-progress"]
    assert main([*args, "--out", str(latents)]) == 0
    assert "encoded 0, skipped 5" in capsys.readouterr().out
    out = tmp_path / "other"
    out.mkdir()
    (out / "encoded.json").write_text(json.dumps(dict(read_settings(latents), band=0.5)))
    assert main([*args, "--out", str(out)]) != 0
    assert "encoded with other settings (band" in capsys.readouterr().err
    assert main([*args[:5], str(tmp_path), *args[6:], "--out", str(tmp_path / "x")]) != 0
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="d3s2 data encode"):
        read_settings(tmp_path)
    assert main([*args, "--out", str(data)]) != 0
    assert "output folder other than the built data folder" in capsys.readouterr().err
    assert not (data / "encoded.json").exists()


def test_a_resumed_encode_removes_the_temp_files_of_a_killed_one(tiny_encoded, tmp_path):
    from tests.data.test_build import ended_pid

    data, vae_dir, latents = tiny_encoded
    out = tmp_path / "latents"
    shutil.copytree(latents, out)
    stale = out / "assets" / f"x.npz.tmp-{ended_pid()}"
    stale.write_bytes(b"partial")
    assert main(["data", "encode", "--data", str(data), "--vae", str(vae_dir), "--resolution", "32", "--no-progress",
                 "--out", str(out)]) == 0
    assert not stale.exists()


def test_progress_off_a_terminal_is_plain_lines(tiny_encoded, tmp_path, capsys, caplog):
    data, vae_dir, _ = tiny_encoded
    with caplog.at_level(logging.INFO):  # pytest's stderr is not a terminal, as a redirected log
        assert main(["data", "encode", "--data", str(data), "--vae", str(vae_dir), "--resolution", "32",
                     "--out", str(tmp_path / "latents")]) == 0
    assert "\r" not in capsys.readouterr().err  # no bar frames
    lines = [r.getMessage() for r in caplog.records if r.name == "d3s2.progress"]
    assert len(lines) == 1 and lines[0].startswith("data encode: 5/5 assets, "), lines


def test_progress_ends_with_its_line_when_encoding_stops_on_an_error(tiny_encoded, tmp_path, caplog,
                                                                     monkeypatch):
    import d3s2.data.encode

    data, vae_dir, _ = tiny_encoded
    real_write = d3s2.data.encode.write_npz_atomic
    written = []

    def disk_full_after_one(path, arrays):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        return real_write(path, arrays)

    monkeypatch.setattr(d3s2.data.encode, "write_npz_atomic", disk_full_after_one)
    with caplog.at_level(logging.INFO):
        assert main(["data", "encode", "--data", str(data), "--vae", str(vae_dir), "--resolution", "32",
                     "--out", str(tmp_path / "latents")]) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "d3s2.progress"]
    assert len(lines) == 1 and lines[0].startswith("data encode: 1/5 assets, "), lines


def test_refined_encoding(tiny_encoded, tmp_path, capsys):
    """``--refine-steps``: recorded, logvar and coords kept, each mean the refinement of that asset alone."""
    from d3s2.data.collate import collate_packed
    from d3s2.models.vae.refine import refine_latent
    from d3s2.models.vae.sparse_sdf_vae import PackedSDFBatch

    data, vae_dir, latents = tiny_encoded
    out = tmp_path / "refined"
    args = ["data", "encode", "--data", str(data), "--vae", str(vae_dir), "--resolution", "32", "--no-progress",
            "--out", str(out)]
    assert main([*args, "--refine-steps", "3", "--refine-lr", "0.3"]) == 0
    assert read_settings(out)["refine_steps"] == 3 and read_settings(out)["refine_lr"] == 0.3
    ds = SparseSDFDataset(data, 32, split=None, with_blocks="packed", with_image=False)
    vae, band = load_vae(vae_dir)
    moved = 0
    for i, name in enumerate(ds.names[:2]):
        base, refined = load_latent(latents, name), load_latent(out, name)
        assert np.array_equal(base["coords"], refined["coords"]) and np.array_equal(base["logvar"], refined["logvar"])
        p = collate_packed([ds[i]])
        batch = PackedSDFBatch.from_inside_bits(p["sdf"], p["blocks"], p["rows"], p["inside"], p["fill"],
                                                sharp=p["sharp"], tau=band).to("cpu")
        with torch.no_grad():
            z, _ = vae.encode(batch.sdf, sample_posterior=False, structure=batch.block_structure())
        want = refine_latent(vae, batch, z, steps=3, lr=0.3).latent
        zc = want.coords[:, 1:].numpy().astype(np.int64)
        order = np.lexsort((zc[:, 2], zc[:, 1], zc[:, 0]))
        np.testing.assert_allclose(refined["mean"].astype(np.float32), want.feats.numpy()[order], atol=3e-3, rtol=3e-3)
        moved += int(np.abs(refined["mean"].astype(np.float32) - base["mean"].astype(np.float32)).max() > 1e-2)
    assert moved  # the refinement changed the latents
    capsys.readouterr()
    assert main([*args, "--refine-steps", "2"]) != 0  # resuming with another refinement
    assert "encoded with other settings (refine_lr, refine_steps" in capsys.readouterr().err


def test_resume_a_folder_written_before_refinement(tiny_encoded, tmp_path, capsys):
    data, vae_dir, latents = tiny_encoded
    old = tmp_path / "old"
    old.mkdir()
    settings = read_settings(latents)
    del settings["refine_steps"]
    (old / "encoded.json").write_text(json.dumps(settings))
    args = ["data", "encode", "--data", str(data), "--vae", str(vae_dir), "--resolution", "32", "--no-progress",
            "--out", str(old)]
    assert main(args) == 0
    assert main([*args, "--refine-steps", "1"]) != 0
    assert "(refine_lr, refine_steps" in capsys.readouterr().err


def test_latents_of_other_vae_weights_are_not_resumed(tiny_encoded, tmp_path, capsys):
    """A VAE retrained into its folder (or another one) does not add its latents to those of the first."""
    from tests.models.dit._data import random_vae_export

    data, vae_dir, latents = tiny_encoded
    out = tmp_path / "latents"
    shutil.copytree(latents, out)
    args = ["data", "encode", "--data", str(data), "--resolution", "32", "--no-progress", "--out", str(out)]
    retrained = random_vae_export(_vae_copy(vae_dir, tmp_path / "vae", None), seed=1)
    assert main([*args, "--vae", str(retrained)]) != 0
    assert "holds the latents of another VAE" in capsys.readouterr().err
    moved = _vae_copy(vae_dir, tmp_path / "moved", json.loads((vae_dir / "vae_task.json").read_text()))
    assert main([*args, "--vae", str(moved)]) == 0  # the same weights elsewhere resume
    assert "encoded 0, skipped 5" in capsys.readouterr().out
    settings = read_settings(out)
    del settings["vae_sha256"]  # a folder written before the weights were recorded: resumed unchecked
    (out / "encoded.json").write_text(json.dumps(settings))
    assert main([*args, "--vae", str(retrained)]) == 0


def _vae_copy(vae_dir, out, task_info: dict | None):
    """The weights of ``vae_dir`` with another ``vae_task.json`` (None: none)."""
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(vae_dir / name, out / name)
    if task_info is not None:
        (out / "vae_task.json").write_text(json.dumps(task_info))
    return out


def _export_info_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "d3s2.models.vae.export_info"]


def test_data_built_with_a_far_band_is_refused_unless_the_band_is_given(tiny_encoded, tmp_path, caplog):
    data, vae_dir, _ = tiny_encoded  # data built with band 0.0625
    vae = _vae_copy(vae_dir, tmp_path / "vae", {"band": 1 / 128, "resolutions": [32]})
    out = tmp_path / "latents"
    # divided by the VAE's 1/128, the data's SDF would span ±8 instead of ±1
    with pytest.raises(ValueError, match=r"built with band 0.0625 but the SS-VAE takes band 0.0078125 \(its "
                                         r"vae_task.json\): its inputs would span ±8"):
        encode_folder(data, vae, out, resolution=32, progress=False)
    assert not out.exists()
    caplog.set_level(logging.WARNING)
    summary = encode_folder(data, vae, out, resolution=32, progress=False, band=0.0625)
    assert summary.encoded == 5 and read_settings(out)["band"] == 0.0625
    assert _export_info_warnings(caplog) == [f"{data} differs from the SS-VAE in band 0.0625 (the SS-VAE was trained "
                                             "with 0.0078125)"]


def test_cli_band_flag_reaches_the_encoder(tiny_encoded, tmp_path, capsys):
    from d3s2.cli import main

    data, vae_dir, _ = tiny_encoded
    vae = _vae_copy(vae_dir, tmp_path / "vae", {"band": 1 / 128, "resolutions": [32]})
    args = ["data", "encode", "--data", str(data), "--vae", str(vae), "--resolution", "32", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 1
    assert "its inputs would span ±8" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "latents"), "--band", "0.0625"]) == 0
    assert read_settings(tmp_path / "latents")["band"] == 0.0625


def test_an_untrained_resolution_is_warned_about(tiny_encoded, tmp_path, caplog):
    data, vae_dir, _ = tiny_encoded
    vae = _vae_copy(vae_dir, tmp_path / "vae", {"band": 0.0625, "resolutions": [64]})
    caplog.set_level(logging.WARNING)
    assert encode_folder(data, vae, tmp_path / "latents", resolution=32, progress=False).encoded == 5
    assert _export_info_warnings(caplog) == [f"{data} differs from the SS-VAE in resolution 32 (the SS-VAE was "
                                             "trained at 64)"]


def test_without_a_task_file_the_default_band_is_assumed(tiny_encoded, tmp_path, caplog):
    data, vae_dir, _ = tiny_encoded
    vae = _vae_copy(vae_dir, tmp_path / "vae", None)
    caplog.set_level(logging.WARNING)
    _, band = load_vae(vae)
    assert band == 1 / 128 and "has no vae_task.json" in _export_info_warnings(caplog)[0]
    with pytest.raises(ValueError, match=r"band 0.0078125 \(the default, as there is no vae_task.json\)"):
        encode_folder(data, vae, tmp_path / "latents", resolution=32, progress=False)
    assert load_vae(vae, 0.0625)[1] == 0.0625
