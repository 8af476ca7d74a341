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
                        "band": 0.0625, "vae": str(vae_dir)}
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
