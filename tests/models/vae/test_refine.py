"""Latent refinement at encode time (:mod:`d3s2.models.vae.refine`) on tiny random SS-VAEs, CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from d3s2.models.vae import SparseSDFVAE
from d3s2.models.vae.losses import sparse_sdf_loss
from d3s2.models.vae.refine import DecoderTargets, refine_latent
from tests.models.vae._cases import sphere_batch, tiny_config

STEPS = 6


@pytest.fixture(scope="module")
def model() -> SparseSDFVAE:
    torch.manual_seed(0)
    vae = SparseSDFVAE(tiny_config())
    torch.nn.init.normal_(vae.decoder.out_layer.weight, std=0.3)  # the zero-initialised head passes no gradient
    return vae.eval()


def _encoded(model, radii=(5.0,), sharp_every=3):
    batch = sphere_batch(16, radii=radii, sharp_every=sharp_every)
    with torch.no_grad():
        z, posterior = model.encode(batch.sdf, sample_posterior=False, structure=batch.block_structure())
    return batch, z, posterior


def test_per_sample_loss_is_the_training_loss_without_kl(model):
    batch, z, posterior = _encoded(model)
    weights = dataclasses.replace(model.config.loss, kl=0.0)
    with torch.no_grad():
        decoded = model.decode(z)
    want, logs = sparse_sdf_loss(decoded, batch.target, batch.in_band, batch.sharp, posterior, weights)
    got, terms = DecoderTargets(decoded, batch).loss(decoded, weights)
    assert got.shape == (1,) and float(terms["l_sharp"][0]) > 0
    torch.testing.assert_close(got[0], want)
    for k in ("l_in", "l_ext", "l_sharp"):
        torch.testing.assert_close(terms[k][0], logs[k])


def test_refinement_lowers_the_loss_and_never_returns_worse(model):
    batch, z, _ = _encoded(model)
    out = refine_latent(model, batch, z, steps=STEPS, lr=0.3)
    assert out.losses.shape == (STEPS + 1, 1) and out.best_step.shape == (1,)
    assert torch.equal(out.latent.coords, z.coords) and out.latent.feats.shape == z.feats.shape
    with torch.no_grad():
        before, _ = DecoderTargets(model.decode(z), batch).loss(model.decode(z), model.config.loss)
        decoded = model.decode(out.latent)
        after, _ = DecoderTargets(decoded, batch).loss(decoded, model.config.loss)
    torch.testing.assert_close(out.losses[0], before)
    assert float(after[0]) < float(before[0]) - 1e-4  # a random decoder: the latent moves its output a little
    assert float(after[0]) == pytest.approx(float(out.losses.min()), rel=1e-5)  # the best one, not the last
    assert int(out.best_step[0]) == int(out.losses[:, 0].argmin())


def test_a_too_large_step_keeps_the_start(model):
    batch, z, _ = _encoded(model)
    out = refine_latent(model, batch, z, steps=2, lr=1e4)  # every update overshoots
    assert int(out.best_step[0]) == 0 and torch.equal(out.latent.feats, z.feats)


def test_zero_steps_returns_the_start(model):
    batch, z, _ = _encoded(model)
    out = refine_latent(model, batch, z, steps=0)
    assert out.latent is z and out.losses.shape == (1, 1) and int(out.best_step[0]) == 0


def test_deterministic_frozen_and_restored(model):
    batch, z, _ = _encoded(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    a = refine_latent(model, batch, z, steps=3)
    b = refine_latent(model, batch, z, steps=3)
    assert torch.equal(a.latent.feats, b.latent.feats) and torch.equal(a.losses, b.losses)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not a.latent.feats.requires_grad
    model.eval()


def test_a_batch_refines_each_sample_as_alone(model):
    batch, z, _ = _encoded(model, radii=(5.0, 4.0), sharp_every=0)
    both = refine_latent(model, batch, z, steps=3, anchor=0.1)
    for b, radius in enumerate((5.0, 4.0)):
        one_batch, one_z, _ = _encoded(model, radii=(radius,), sharp_every=0)
        one = refine_latent(model, one_batch, one_z, steps=3, anchor=0.1)
        rows = z.coords[:, 0] == b
        torch.testing.assert_close(both.losses[:, b], one.losses[:, 0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(both.latent.feats[rows], one.latent.feats, rtol=1e-4, atol=1e-5)


def test_anchor_keeps_the_latent_closer(model):
    batch, z, _ = _encoded(model)
    free = refine_latent(model, batch, z, steps=4, lr=0.3)
    held = refine_latent(model, batch, z, steps=4, lr=0.3, anchor=100.0)
    shift = lambda r: float((r.latent.feats - z.feats).pow(2).mean())  # noqa: E731
    assert shift(held) < shift(free)


def test_errors(model):
    batch, z, _ = _encoded(model)
    with pytest.raises(ValueError, match="steps >= 0"):
        refine_latent(model, batch, z, steps=-1)
    with pytest.raises(ValueError, match="lr > 0"):
        refine_latent(model, batch, z, steps=1, lr=0.0)
    other = sphere_batch(32, radii=(9.0,))
    with pytest.raises(ValueError, match="expected a latent at resolution 4"):
        refine_latent(model, other, z, steps=1)


def test_the_progress_bar_counts_the_steps_and_ends_full(model, capsys):
    batch, z, _ = _encoded(model)
    refine_latent(model, batch, z, steps=2, progress=True)
    bar = capsys.readouterr().err.split("\r")[-1]  # the bar's final state
    assert "2/2" in bar and "100%" in bar, bar
