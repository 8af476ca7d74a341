"""``d3s2 data encode``: the latent folder format, agreement with the VAE's own encoder, resuming, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from d3s2.cli import main
from d3s2.data.dataset import SparseSDFDataset
from d3s2.data.encode import latent_names, load_latent, load_vae, read_settings
from d3s2.sparse import SparseTensor


def test_format_and_round_trip(tiny_encoded):
    data, vae_dir, latents = tiny_encoded
    settings = json.loads((latents / "encoded.json").read_text())
    assert settings == {"format": "d3s2-latents", "resolution": 32, "latent_resolution": 4, "channels": 8,
                        "band": 0.0625, "vae": str(vae_dir), "refine_steps": 0}
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
    assert "vae_task.json" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="d3s2 data encode"):
        read_settings(tmp_path)


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
