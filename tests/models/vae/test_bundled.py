"""The demo SS-VAE bundled in the package (``d3s2/assets/ss_vae_256``): found without ``--weights``, loads, and
round-trips a sphere at its training resolution (256³) on the CPU."""

from __future__ import annotations

import pytest
import torch

from d3s2.models.registry import from_pretrained
from d3s2.models.vae import SparseSDFBatch, SparseSDFVAE
from d3s2.models.vae.cli import WEIGHTS_ENV, bundled_vae_dir, resolve_weights
from d3s2.models.vae.export_info import read_task_file
from tests.models.vae._cases import sphere_sample

RES, RADIUS, HALF = 256, 12.0, 16  # a sphere of 12 voxels in a 32³ corner-free box at the grid's centre


def _sphere_at_256() -> SparseSDFBatch:
    """The band (|SDF| < τ = one voxel, the bundled model's band at 256³) and block targets of a small sphere."""
    coords, sdf, blocks, block_sdf = sphere_sample(RES, RADIUS, tau=1.0, window=(RES // 2 - HALF, RES // 2 + HALF))
    return SparseSDFBatch.from_samples([coords], [sdf], [blocks], [block_sdf], resolution=RES)


def test_bundled_weights_are_the_default(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert resolve_weights(None) == str(bundled_vae_dir())
    assert resolve_weights("runs/x/export") == "runs/x/export"
    assert read_task_file(resolve_weights(None))["band"] == pytest.approx(1 / 128)


def test_missing_bundle_says_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.setattr("d3s2.models.vae.cli.bundled_vae_dir", lambda: tmp_path / "none")
    with pytest.raises(ValueError, match="no SS-VAE weights: pass --weights DIR"):
        resolve_weights(None)


def test_bundled_vae_round_trips_a_sphere():
    model = from_pretrained(bundled_vae_dir())
    assert isinstance(model, SparseSDFVAE) and model.config.latent_structure == "blocks"
    batch = _sphere_at_256()
    with torch.no_grad():
        z, _ = model.eval().encode(batch.sdf, sample_posterior=False, structure=batch.block_structure())
        decoded = model.decode(z)
    from d3s2.ops.conv.reference import lookup

    row = lookup(decoded.coords, batch.sdf.coords, RES).long()  # each band voxel's decoded row
    assert bool((row >= 0).all())  # every band voxel is decoded
    pred, want = decoded.feats[row, 0], batch.sdf.feats[:, 0]
    clear = want.abs() > 0.3  # voxels whose sign a sub-voxel shift of the surface cannot flip
    agree = float(((pred > 0) == (want > 0))[clear].float().mean())
    mae = float((pred - want).abs().mean())
    # measured: 0.989 and 0.155 voxels; a decoder with random weights: 0.57 and 0.90
    assert agree > 0.97 and mae < 0.3, (agree, mae)
