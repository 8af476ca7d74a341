"""A tiny conditional flow model learns a two-mode 2-D distribution on the CPU; guidance picks the mode."""

import math

import torch
from torch import nn

from d3s2.flow import cfm_loss, interpolate, model_timesteps, randn_like_latent, sample_euler, sample_timesteps

MODES = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
NO_LABEL = 2


class ToyVelocity(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.label = nn.Embedding(3, 16)
        self.net = nn.Sequential(nn.Linear(2 + 16 + 8, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x, t, cond):
        tt = (t / 1000.0)[:, None] * torch.arange(1, 5, dtype=torch.float32) * math.pi
        return self.net(torch.cat([x, self.label(cond), torch.sin(tt), torch.cos(tt)], 1))


def test_toy_flow_learns_modes_and_guidance_selects_one():
    g = torch.Generator().manual_seed(0)
    model = ToyVelocity()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(400):
        label = torch.randint(0, 2, (256,), generator=g)
        x0 = MODES[label] + 0.1 * torch.randn(256, 2, generator=g)
        cond = torch.where(torch.rand(256, generator=g) < 0.2, NO_LABEL, label)  # condition dropout for CFG
        eps = randn_like_latent(x0, g)
        t = sample_timesteps(256, generator=g)
        loss = cfm_loss(model(interpolate(x0, eps, t), model_timesteps(t), cond), x0, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-50:]) / 50 < 0.6 * sum(losses[:50]) / 50
    n = 400
    noise = randn_like_latent(torch.empty(n, 2), torch.Generator().manual_seed(1))
    for label in (0, 1):
        out = sample_euler(model, noise, steps=25, cond=torch.full((n,), label))
        assert float((torch.cdist(out, MODES[label:label + 1]) < 0.5).float().mean()) > 0.9
    free = sample_euler(model, noise, steps=25, cond=torch.full((n,), NO_LABEL))
    assert 0.3 < float((torch.cdist(free, MODES).argmin(1) == 0).float().mean()) < 0.7  # both modes
    guided = sample_euler(model, noise, steps=25, cond=torch.zeros(n, dtype=torch.long),
                          uncond=torch.full((n,), NO_LABEL), guidance_scale=3.0)
    assert float((torch.cdist(guided, MODES[:1]) < 0.5).float().mean()) > 0.95
