import numpy as np
import pytest
import torch

from d3s2.flow import euler_sigmas, randn_like_latent, sample_euler
from d3s2.sparse import SparseTensor


def _diffusers_sigmas(steps: int, shift: float, n_train: int = 1000) -> np.ndarray:
    """diffusers FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps).sigmas, written out independently."""
    train_t = np.linspace(1, n_train, n_train)[::-1] / n_train
    train_sigmas = shift * train_t / (1 + (shift - 1) * train_t)
    ts = np.linspace(train_sigmas[0] * n_train, train_sigmas[-1] * n_train, steps) / n_train
    return np.append(shift * ts / (1 + (shift - 1) * ts), 0.0)


@pytest.mark.parametrize("steps,shift", [(50, 6.0), (30, 6.0), (15, 8.0), (1, 1.0)])
def test_sigmas_match_published_schedule(steps, shift):
    s = euler_sigmas(steps, shift=shift)
    assert s.shape == (steps + 1,) and s[0] == 1.0 and s[-1] == 0.0
    assert bool((s[1:] < s[:-1]).all())
    np.testing.assert_allclose(s.numpy(), _diffusers_sigmas(steps, shift), rtol=1e-12, atol=1e-12)


def _to_point(c: torch.Tensor):
    """Velocity of the flow that carries everything to the point c: v = (x - c) / t (straight paths)."""
    def model(x, t, cond):
        sig = t / 1000.0
        if isinstance(x, SparseTensor):
            return x.replace((x.feats - c) / sig[x.batch_index][:, None])
        return (x - c) / sig.view(-1, *([1] * (x.ndim - 1)))
    return model


def test_euler_is_exact_on_straight_paths_dense_and_sparse():
    c = torch.tensor([0.5, -2.0, 3.0])
    noise = torch.randn(4, 3)
    out = sample_euler(_to_point(c), noise, steps=7, shift=6.0)
    torch.testing.assert_close(out, c.expand(4, 3))
    sx = SparseTensor.from_samples([torch.tensor([[0, 0, 0], [1, 1, 1]]), torch.tensor([[2, 2, 2]])],
                                   [torch.randn(2, 3), torch.randn(1, 3)], resolution=4)
    sout = sample_euler(_to_point(c), sx, steps=3)
    assert isinstance(sout, SparseTensor) and torch.equal(sout.coords, sx.coords)
    torch.testing.assert_close(sout.feats, c.expand(3, 3))


def test_constant_velocity_moves_by_exactly_one_unit():
    v = torch.tensor([1.0, -3.0])
    noise = torch.zeros(2, 2)
    out = sample_euler(lambda x, t, cond: v.expand_as(x), noise, steps=10, shift=8.0)
    torch.testing.assert_close(out, -v.expand(2, 2))


class _CondModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append(x.shape[0])
        return self.lin(x) * torch.tanh(t / 1000)[:, None] + cond


def test_cfg_one_batched_forward_equals_two_separate_passes():
    model = _CondModel()
    noise = torch.randn(2, 3)
    cond, uncond = torch.randn(2, 3), torch.zeros(2, 3)
    out = sample_euler(model, noise, steps=5, cond=cond, uncond=uncond, guidance_scale=7.0, shift=6.0)
    assert model.calls == [4] * 5  # one forward of the doubled batch per step
    x = noise.clone()
    sig = euler_sigmas(5, shift=6.0)
    with torch.no_grad():
        for i in range(5):
            t = torch.full((2,), float(sig[i]) * 1000)
            vc, vu = model(x, t, cond), model(x, t, uncond)
            x = x + float(sig[i + 1] - sig[i]) * (vu + 7.0 * (vc - vu))
    torch.testing.assert_close(out, x)


def test_cfg_sparse_with_dict_conditions():
    def model(x, t, cond):
        assert x.batch_size == 4 and cond["tokens"].shape[0] == 4
        return x.replace(x.feats * 0.1 + cond["tokens"][x.batch_index])
    sx = SparseTensor.from_samples([torch.tensor([[0, 0, 0], [1, 1, 1]]), torch.tensor([[2, 2, 2]])],
                                   [torch.randn(2, 2), torch.randn(1, 2)], resolution=4)
    cond, uncond = {"tokens": torch.randn(2, 2)}, {"tokens": torch.zeros(2, 2)}
    out = sample_euler(model, sx, steps=3, cond=cond, uncond=uncond, guidance_scale=3.0)
    ref = sx.feats.clone()
    sig = euler_sigmas(3)
    for i in range(3):
        vc = ref * 0.1 + cond["tokens"][sx.batch_index]
        vu = ref * 0.1
        ref = ref + float(sig[i + 1] - sig[i]) * (vu + 3.0 * (vc - vu))
    torch.testing.assert_close(out.feats, ref)


def test_seeded_sampling_is_reproducible_and_errors_are_clear():
    model = _CondModel()
    cond = torch.randn(1, 3)

    def run(seed):
        noise = randn_like_latent(torch.empty(1, 3), torch.Generator().manual_seed(seed))
        return sample_euler(model, noise, steps=4, cond=cond, uncond=torch.zeros(1, 3), guidance_scale=2.0)
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    with pytest.raises(ValueError, match="uncond"):
        sample_euler(model, torch.zeros(1, 3), steps=2, cond=cond, guidance_scale=2.0)
    with pytest.raises(ValueError, match="at least one step"):
        euler_sigmas(0)
    with pytest.raises(TypeError, match="cannot batch conditions"):
        sample_euler(model, torch.zeros(1, 3), steps=2, cond=object(), uncond=object(), guidance_scale=2.0)


class _SparseCondModel(torch.nn.Module):
    """Sparse model whose output uses a structure-cached value, recording which cache each call saw."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.caches, self.builds = [], 0

    def _build(self, x):
        self.builds += 1
        return x.coords[:, 1:].float().sum(1, keepdim=True)

    def forward(self, x, t, cond):
        self.caches.append(id(x._cache))
        pos = x.cached("test_pos", lambda: self._build(x))
        return x.replace(self.lin(x.feats) * torch.tanh(t / 1000)[x.batch_index][:, None] + cond[x.batch_index] + pos)


def test_sparse_cfg_reuses_one_structure_across_steps_and_matches_per_step_cat():
    model = _SparseCondModel()
    noise = SparseTensor.from_samples([torch.tensor([[0, 0, 0], [1, 2, 3]]), torch.tensor([[2, 2, 2]])],
                                      [torch.randn(2, 3), torch.randn(1, 3)], resolution=4)
    cond, uncond = torch.randn(2, 3), torch.zeros(2, 3)
    out = sample_euler(model, noise, steps=4, cond=cond, uncond=uncond, guidance_scale=5.0, shift=3.0)
    assert len(set(model.caches)) == 1 and model.builds == 1  # structure work done once, not per step
    x = noise.feats.clone()
    sig = euler_sigmas(4, shift=3.0)
    with torch.no_grad():
        for i in range(4):
            t = torch.full((4,), float(sig[i]) * 1000)
            xx = SparseTensor.cat([noise.replace(x), noise.replace(x)])  # a fresh structure, as before
            v = model(xx, t, torch.cat([cond, uncond])).feats
            vc, vu = v[:3], v[3:]
            x = x + float(sig[i + 1] - sig[i]) * (vu + 5.0 * (vc - vu))
    assert torch.equal(out.feats, x) and torch.equal(out.coords, noise.coords)
