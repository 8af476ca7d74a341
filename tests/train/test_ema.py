"""EMA arithmetic, temporary swap-in, and state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d3s2.train.ema import EMA


def test_ema_matches_manual_average():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    manual = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for n, p in model.named_parameters():
            manual[n] = 0.9 * manual[n] + 0.1 * p.detach()
    for n, v in ema.params.items():
        torch.testing.assert_close(v, manual[n])
    warm = EMA(model, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


def test_applied_to_restores_and_state_round_trip():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5, warmup=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    trained = model.weight.detach().clone()
    with ema.applied_to(model):
        torch.testing.assert_close(model.weight, before["weight"] + 0.5)
    torch.testing.assert_close(model.weight, trained)
    other = EMA(nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1
    torch.testing.assert_close(other.params["weight"], ema.params["weight"])
    with pytest.raises(ValueError, match="does not match"):
        EMA(nn.Linear(3, 2, bias=False), decay=0.5).load_state_dict(ema.state_dict())
