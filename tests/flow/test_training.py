import pytest
import torch

from d3s2.flow import (
    cfm_loss,
    interpolate,
    model_timesteps,
    randn_like_latent,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)
from d3s2.sparse import SparseTensor


def _sparse(c: int = 3) -> SparseTensor:
    coords = [torch.tensor([[0, 0, 0], [1, 2, 3], [3, 3, 3]]), torch.tensor([[1, 1, 1], [2, 0, 1]])]
    feats = [torch.randn(3, c), torch.randn(2, c)]
    return SparseTensor.from_samples(coords, feats, resolution=4)


def test_interpolate_endpoints_and_target_is_time_derivative():
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.equal(interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(3)), eps)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    h = 1e-6
    x0d, epsd = x0.double(), eps.double()
    fd = (interpolate(x0d, epsd, t + h) - interpolate(x0d, epsd, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x0d, epsd))
    mid = interpolate(x0, eps, torch.tensor([0.25, 0.25, 0.25]))
    torch.testing.assert_close(mid, 0.75 * x0 + 0.25 * eps)


def test_interpolate_sparse_uses_one_t_per_sample():
    x0 = _sparse()
    eps = randn_like_latent(x0, torch.Generator().manual_seed(1))
    xt = interpolate(x0, eps, torch.tensor([0.0, 1.0]))
    assert isinstance(xt, SparseTensor) and torch.equal(xt.coords, x0.coords)
    torch.testing.assert_close(xt.feats[:3], x0.feats[:3])
    torch.testing.assert_close(xt.feats[3:], eps.feats[3:])
    with pytest.raises(ValueError, match="expected t of shape"):
        interpolate(x0, eps, torch.zeros(3))


def test_shift_values():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    s = shift_timesteps(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and bool((s[1:] > s[:-1]).all())
    assert float(shift_timesteps(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    assert bool((s >= t).all())  # shift > 1 moves mass towards noise
    with pytest.raises(ValueError, match="positive shift"):
        shift_timesteps(t, 0.0)


def test_sample_timesteps_logit_normal_and_seeded():
    a = sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    b = sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert bool(((a > 0) & (a < 1)).all())
    logit = torch.log(a / (1 - a))
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1) < 0.03
    shifted = sample_timesteps(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, shift_timesteps(a, 3.0))
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.02)


def test_cfm_loss_zero_at_target_and_mse_otherwise():
    x0, eps = torch.randn(2, 8), torch.randn(2, 8)
    assert float(cfm_loss(eps - x0, x0, eps)) == 0.0
    assert float(cfm_loss(eps - x0 + 2.0, x0, eps)) == pytest.approx(4.0)
    sx = _sparse()
    seps = randn_like_latent(sx)
    assert float(cfm_loss(seps.replace(seps.feats - sx.feats + 1.0), sx, seps)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="expected a prediction of shape"):
        cfm_loss(torch.zeros(2, 7), x0, eps)


def test_noise_is_reproducible_and_model_timesteps_scale():
    x = _sparse()
    n1 = randn_like_latent(x, torch.Generator().manual_seed(5))
    n2 = randn_like_latent(x, torch.Generator().manual_seed(5))
    n3 = randn_like_latent(x, torch.Generator().manual_seed(6))
    assert torch.equal(n1.feats, n2.feats) and not torch.equal(n1.feats, n3.feats)
    assert torch.equal(model_timesteps(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, 500.0, 1000.0]))
