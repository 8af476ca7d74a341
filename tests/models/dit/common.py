"""Shared fixtures for the DiT tests: published key tables, tiny configs and random sparse inputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from d3s2.models.dit import ConditionTokens, DenseDiT, SparseDiT
from d3s2.sparse import SparseTensor

PUBLISHED = json.loads((Path(__file__).parent / "published_dit_keys.json").read_text())


def published_keys(name: str) -> dict[str, tuple[int, ...]]:
    """Expand the key table of ``name`` ('dense_dit', 'sparse_dit_v1.1', 'sparse_dit_v1.0') in order."""
    entry = PUBLISHED[name]
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in entry["keys"]:
        if key == "blocks.{i}.":
            for i in range(entry["num_blocks"]):
                for sub, s in shape:
                    out[f"blocks.{i}.{sub}"] = tuple(s)
        else:
            out[key] = tuple(shape)
    return out


def tiny_dense(**kw) -> DenseDiT:
    cfg = dict(resolution=4, in_channels=3, out_channels=3, model_channels=32, cond_channels=24, num_blocks=2,
               num_heads=2)
    return DenseDiT(DenseDiT.Config(**{**cfg, **kw}))


def tiny_sparse(**kw) -> SparseDiT:
    cfg = dict(resolution=8, in_channels=4, out_channels=4, model_channels=32, cond_channels=24, num_blocks=2,
               num_heads=4, num_kv_heads=2, attention="full")
    return SparseDiT(SparseDiT.Config(**{**cfg, **kw}))


def random_sparse(counts=(5, 9), channels: int = 4, resolution: int = 8, seed: int = 0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    coords, feats = [], []
    for n in counts:
        flat = torch.randperm(resolution**3, generator=g)[:n]
        c = torch.stack([flat // resolution**2, flat // resolution % resolution, flat % resolution], 1)
        coords.append(c)
        feats.append(torch.randn(n, channels, generator=g))
    return SparseTensor.from_samples(coords, feats, resolution=resolution)


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Add noise to every parameter so zero-initialised gates and outputs become active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def random_cond(batch: int, length: int = 6, channels: int = 24, seed: int = 0) -> ConditionTokens:
    g = torch.Generator().manual_seed(seed)
    return ConditionTokens(torch.randn(batch, length, channels, generator=g))
